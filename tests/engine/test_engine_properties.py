"""Scheduler and block manager invariants under random workloads (hypothesis, no model).

A pure-Python driver replaces the runner: it "samples" tokens from a seeded RNG. After every step:
no block is shared between two requests, every live reference is accounted for, usage never
exceeds the pool, each sequence's context covers exactly its visible tokens. At the end every
block is free and every reference count is zero.
"""

import random
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parathinker.config import SamplingParams
from parathinker.engine.block_manager import BlockManager
from parathinker.engine.request import FAILED, FINISHED, Request
from parathinker.engine.scheduler import Scheduler
from parathinker.spec.tokens import ControlTokens

CTRL = ControlTokens(think_open=tuple(range(100, 108)), think_close=tuple(range(110, 118)),
                     summary_open=120, summary_close=121, eos=2, pad=122,
                     base_think_open=123, base_think_close=124)
TEMPLATE = [120, 50, 51]

request_st = st.fixed_dictionaries({
    "prompt_len": st.integers(1, 20),
    "num_paths": st.integers(1, 8),
    "max_path_tokens": st.integers(2, 12),
    "max_summary_tokens": st.integers(4, 10),
    "min_finished": st.floats(0, 1),
    "abort_at": st.one_of(st.none(), st.integers(0, 30)),
})


def check_invariants(bm, live):
    owners = {}
    expected_refs = Counter()
    for req in live:
        for seq in req.seqs():
            expected_refs.update(seq.blocks)
            expected_refs.update(seq.forked)
            for b in seq.blocks + seq.forked:
                assert owners.setdefault(b, req.request_id) == req.request_id, "block shared"
    assert all(bm.ref_counts[b] == n for b, n in expected_refs.items())
    assert sum(bm.ref_counts) == sum(expected_refs.values())
    assert bm.num_used == len(expected_refs) <= bm.num_blocks
    assert bm.peak_used <= bm.num_blocks


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=st.lists(request_st, min_size=1, max_size=8), num_blocks=st.integers(4, 60),
       block_size=st.sampled_from([1, 2, 4, 16]), max_tokens=st.integers(8, 64), seed=st.integers(0, 9))
def test_random_workloads_keep_the_pool_consistent(reqs, num_blocks, block_size, max_tokens, seed):
    rng = random.Random(seed)
    bm = BlockManager(num_blocks, block_size)
    sched = Scheduler(bm, max_tokens)
    all_reqs = []
    for i, r in enumerate(reqs):
        p = SamplingParams(num_paths=r["num_paths"], max_path_tokens=r["max_path_tokens"],
                           max_summary_tokens=r["max_summary_tokens"],
                           min_finished_paths=1 + int(r["min_finished"] * (r["num_paths"] - 1)),
                           temperature=0)
        req = Request(f"r{i}", i, [7] * r["prompt_len"], p, CTRL, TEMPLATE)
        sched.add(req)
        all_reqs.append((req, r["abort_at"]))
    step = 0
    while sched.has_unfinished():
        step += 1
        assert step < 5000, "no progress"
        for req, abort_at in all_reqs:
            if abort_at == step:
                sched.abort(req.request_id)
        scheduled, failed = sched.schedule()
        for req in failed:  # only a request bigger than the whole pool may fail
            assert req.status == FAILED and req.num_blocks_needed(block_size) > num_blocks
        for req, budget in scheduled:
            held = {b for seq in req.seqs() for b in seq.blocks + seq.forked}
            work = req.work(budget)
            assert 0 < sum(len(w.token_ids) for w in work) <= max(budget, 1)
            for w in work:
                slots = [s for a, n in w.context for s in range(a, a + n)]
                assert len(slots) == len(set(slots))
                assert {s // block_size for s in slots} <= held
                # the new tokens are the context's last slots, and the sequence's own
                assert slots[len(slots) - len(w.token_ids):] == \
                    w.seq.slots[w.seq.num_computed: w.seq.num_computed + len(w.token_ids)]
            req.mark_computed(work)
            if not req.is_computed():  # a chunk of a long prefill or recompute: no sampling
                continue
            if req.summary is None:
                ks = req.paths_to_sample()
                choices = [rng.choice([9, 10, 11, CTRL.eos, 110, 124]) for _ in ks]
                req.apply_paths(ks, choices)
            else:
                req.apply_summary(rng.choice([9, 10, 121]))
            if req.status == FINISHED:
                sched.finish(req)
        check_invariants(bm, sched.running + sched.waiting)
    assert bm.num_used == 0 and not any(bm.ref_counts) and bm.num_free == num_blocks
    for req, _ in all_reqs:
        if req.status == FINISHED:
            assert all(f is not None for f in req.path_finish) and req.summary_finish is not None


def test_context_of_summary_is_prompt_then_every_path():
    bm = BlockManager(64, 4)
    p = SamplingParams(num_paths=2, max_path_tokens=3, max_summary_tokens=6, temperature=0)
    req = Request("r", 0, [7] * 5, p, CTRL, TEMPLATE)
    sched = Scheduler(bm, 100)
    sched.add(req)
    ((r, _),), _ = sched.schedule()
    r.mark_computed(r.work())
    r.apply_paths([0, 1], [9, 9])  # both paths now hold 2 tokens: at budget next step
    ((r, _),), _ = sched.schedule()
    r.mark_computed(r.work())
    r.apply_paths([], [])
    assert r.path_finish == ["budget", "budget"] and r.summary is not None
    ((r, _),), _ = sched.schedule()
    work = r.work()
    summary = work[-1]
    expected = r.prompt.slots + r.paths[0].slots + r.paths[1].slots + r.summary.slots
    assert [s for a, n in summary.context for s in range(a, a + n)] == expected
    assert summary.positions == [5 + 3 + i for i in range(len(TEMPLATE))]
    # The paths share the prompt's blocks by reference: the prompt's 2 blocks have 4 readers.
    assert [bm.ref_counts[b] for b in r.prompt.blocks] == [4, 4]
    assert len(r.prompt.slots) == 5 and r.paths[0].slots[0] // 4 not in r.prompt.blocks
