"""The engine at long contexts, on tiny models: chunked prefill and recompute, slot runs,
seeded sampling independent of the batch, failure isolation, validation at the boundary."""

import pytest
import torch
from parathinker.testing.checkpoints import make_checkpoint

from parathinker import LLM, SamplingParams
from parathinker.config import PlainParams
from parathinker.engine.block_manager import BlockManager
from parathinker.engine.request import Request, Seq
from parathinker.engine.scheduler import Scheduler
from tests.engine.test_engine import params, same
from tests.engine.test_engine_properties import CTRL, TEMPLATE


def count_forward_tokens(llm, monkeypatch):
    sizes = []
    run = llm.engine.runner.run

    def spy(work):
        sizes.append(sum(len(w.token_ids) for w in work))
        return run(work)

    monkeypatch.setattr(llm.engine.runner, "run", spy)
    return sizes


def test_chunked_prefill_and_recompute_match_reference(ckpt_dir, monkeypatch):
    """A 7-token step budget: prompts of ~60 tokens, the summary template and every recompute
    after preemption run in chunks; no forward ever holds more than 7 tokens."""
    llm = LLM(str(ckpt_dir), device="cpu", dtype="float32", block_size=4, num_kv_blocks=160,
              max_num_batched_tokens=7)
    sizes = count_forward_tokens(llm, monkeypatch)
    long_q = "Let x be a number. Then 2x + 3 = 11, so x = 4. Check: 2*4+3 = 11. " * 2
    questions = [long_q + str(i) for i in range(5)]
    p = params(num_paths=3, max_path_tokens=20, min_path_tokens=12, min_finished_paths=3,
               max_summary_tokens=80)
    outs = llm.generate(questions, p)
    assert max(sizes) <= 7 and len(llm.encode_prompts(questions[:1], None)[0]) > 40
    assert sum(o.metrics["num_preemptions"] for o in outs) > 0, "the pool was meant to be too small"
    for o, q in zip(outs, questions):
        same(o, llm.generate_slow_twin([q], p)[0])
    assert llm.engine.block_manager.num_used == 0


def test_seeded_request_same_alone_in_a_batch_and_after_preemption(ckpt_dir):
    p = params(num_paths=3, max_path_tokens=16, temperature=1.0, top_p=0.9, top_k=40, seed=7)
    others = [params(num_paths=k, temperature=t, seed=s, max_path_tokens=16)
              for k, t, s in [(2, 0.7, 1), (4, 0.0, None), (1, 1.3, 3), (3, 0.5, 4), (2, 1.0, None),
                              (4, 0.9, 6), (1, 0.0, 8)]]
    q = ["What is 2+3?"]
    roomy = LLM(str(ckpt_dir), device="cpu", dtype="float32")
    alone = roomy.generate(q, p)[0]
    engine = roomy.engine
    ids = roomy.encode_prompts(["Sum 1..10", "abc", "Find x", "Check 7*3", "x", "y", "z"], None)
    reqs = [engine.add_request(f"o{i}", ids[i], op) for i, op in enumerate(others)]
    mine = engine.add_request("mine", roomy.encode_prompts(q, None)[0], p)
    engine.run_to_completion()
    same(roomy.request_output(mine), alone)
    assert all(r.status == "finished" for r in reqs)
    tight = LLM(str(ckpt_dir), device="cpu", dtype="float32", block_size=4, num_kv_blocks=110)
    outs = tight.generate(q * 4, p)
    assert sum(o.metrics["num_preemptions"] for o in outs) > 0
    for o in outs:
        same(o, alone)
    same(roomy.generate_slow_twin(q, p)[0], alone)


def test_a_request_that_breaks_a_step_fails_alone(llm, monkeypatch):
    engine = llm.engine
    ids = llm.encode_prompts(["What is 2+3?", "abc", "Sum 1..10"], None)
    p = params(num_paths=2)
    expected = [llm.generate(prompt_token_ids=[i], params=p)[0] for i in ids]
    reqs = [engine.add_request(f"ok{i}", i_ids, p) for i, i_ids in enumerate(ids)]
    bad = engine.add_request("poison", ids[0], p)
    rows = bad.sample_rows

    def poisoned():  # the poisoned request breaks every step once its summary runs
        if bad.summary is not None:
            raise FloatingPointError("poisoned row")
        return rows()

    monkeypatch.setattr(bad, "sample_rows", poisoned)
    engine.run_to_completion()
    assert bad.status == "failed" and "poisoned row" in bad.error
    for req, exp in zip(reqs, expected):
        same(llm.request_output(req), exp)
    assert engine.block_manager.num_used == 0


def test_add_request_validates(llm):
    engine = llm.engine
    with pytest.raises(ValueError, match="empty prompt"):
        engine.add_request("e", [], params())
    with pytest.raises(ValueError, match="outside"):
        engine.add_request("v", [5, llm.model.vocab_size], params())
    with pytest.raises(TypeError, match="SamplingParams or PlainParams"):
        engine.add_request("t", [5, 6], {"num_paths": 2})
    with pytest.raises(ValueError, match="num_paths=9"):
        engine.add_request("n", [5, 6], params(num_paths=9))
    assert not engine.has_unfinished()
    (o,) = llm.generate_sequential(prompt_token_ids=[[5, 6, 7]], params=PlainParams(max_tokens=3))
    assert o.error is None and len(o.token_ids) == 3


def test_readmitted_request_keeps_its_arrival_order():
    bm = BlockManager(12, 4)
    sched = Scheduler(bm, 1000)
    p = SamplingParams(num_paths=2, max_path_tokens=12, min_path_tokens=12, max_summary_tokens=6,
                       temperature=0, min_finished_paths=2)
    a, b = (Request(n, i, [7] * 8, p, CTRL, TEMPLATE) for i, n in enumerate("ab"))
    sched.add(a)
    sched.add(b)
    sched.schedule()
    assert [r.request_id for r in sched.running] == ["a", "b"]
    sched._preempt(a)  # as if a had been the victim once
    sched.schedule()
    assert [r.request_id for r in sched.running] == ["a", "b"], "a is back before b"


def test_lockstep_growth_keeps_slot_runs_few():
    """Eight paths growing a token at a time, as in decoding: each sequence's slots stay in a
    few long runs of the pool, so attention reads them as a few views. In a fresh pool, new
    extents start below twice the blocks in use (rounded up to a power of two, so that a pool's
    written blocks follow its peak use: test_block_manager): the paths, started next to each
    other, would jump about once per doubling of the blocks in use (4-6 runs of 2,000 tokens
    here); a path whose next block is taken moves to one extent instead (BlockManager.move)."""
    bm = BlockManager(4096, 16)
    prompt = Seq([1] * 100, 0, 0)
    prompt.place(bm)
    paths = [Seq([1], k + 1, 100) for k in range(8)]
    for _ in range(2000):
        for s in paths:
            s.tokens.append(2)
            s.place(bm)
    assert prompt.runs == [[0, 100]]
    assert all(len(s.runs) == 1 for s in paths), [len(s.runs) for s in paths]
    assert all(sum(n for _, n in s.runs) == len(s.tokens) for s in paths)


def test_llama_checkpoint_runs_chunked(tmp_path):
    llm = LLM(str(make_checkpoint(tmp_path / "llama", model_type="llama", end_boost=1.3)),
              device="cpu", dtype="float32", max_num_batched_tokens=5)
    p = params(num_paths=2)
    same(llm.generate(["What is 2+3?"], p)[0], llm.generate_slow_twin(["What is 2+3?"], p)[0])


def test_long_prompt_packed_linears_equal_plain(ckpt_dir, monkeypatch):
    """A prompt of ~840 tokens in one step: every prepacked linear computes its rows in one padded
    oneDNN call (over the 256-row chunks of before; fast_linear.CHUNK_ROWS); greedy tokens equal
    those of plain F.linear, token for token (float32), and the slow twin's."""
    plain = LLM(str(ckpt_dir), device="cpu", dtype="float32", linear="plain")
    packed = LLM(str(ckpt_dir), device="cpu", dtype="float32", linear="packed")
    assert (plain.linear_backend, packed.linear_backend) == ("plain", "packed")
    sizes = count_forward_tokens(packed, monkeypatch)
    question = "Let x be a number. Then 2x + 3 = 11, so x = 4. Check: 2*4+3 = 11. " * 12
    p = params(num_paths=4, max_path_tokens=12, max_summary_tokens=90)
    (a,), (b,) = plain.generate([question], p), packed.generate([question], p)
    assert max(sizes) >= len(packed.encode_prompts([question], None)[0]) > 600
    same(a, b)
    same(b, packed.generate_slow_twin([question], p)[0])


def test_a_lone_prompt_gets_one_extent():
    """A prompt of N blocks placed at once gets N consecutive blocks, in a fresh pool and in one
    where requests came and went (allocate_next is told it wants all N)."""
    bm = BlockManager(2176, 16)
    for _ in range(3):
        prompt = Seq([1] * 4000, 0, 0)
        prompt.place(bm)
        n = -(-4000 // 16)
        assert prompt.blocks == list(range(prompt.blocks[0], prompt.blocks[0] + n))
        assert prompt.runs == [[prompt.blocks[0] * 16, 4000]]
        bm.free(prompt.blocks)


@pytest.mark.parametrize("prompt_len", [128, 130])
def test_a_path_starts_right_after_its_prompt(prompt_len):
    """A request's first path takes the block after its prompt's last one when that is free:
    with a prompt that fills its blocks the path's context is one run of the pool, else two
    (the prompt's last block is only partly its)."""
    bm = BlockManager(2176, 16)
    p = SamplingParams(num_paths=2, max_path_tokens=100, temperature=0, min_finished_paths=2)
    req = Request("r", 0, [7] * prompt_len, p, CTRL, TEMPLATE)
    req.allocate(bm)
    for path in req.paths:
        path.tokens += [9] * 40
    req.allocate(bm)
    first, second = req.paths
    assert first.blocks[0] == req.prompt.blocks[-1] + 1
    assert second.blocks[0] not in (req.prompt.blocks[-1] + 1, first.blocks[-1] + 1)
    context = req.context(first, len(first.tokens))
    expected = [a + i for a, n in req.prompt.runs for i in range(n)] + first.slots
    assert [a + i for a, n in context for i in range(n)] == expected
    assert len(context) == (1 if prompt_len % 16 == 0 else 2)


def test_separate_requests_decoding_side_by_side_read_one_run_each():
    """The long-context bench's separate step (bench/long_context.py): 8 one-path requests of a
    128-token prompt, each path decoding to 4,096 tokens of context in lockstep, in a pool of
    4,096 x 8 + 128 x 8 + 1,024 slots, the second time round (the pool's reach already its
    size). Each prompt is centred in the largest free run and its path continues it: one run
    per context (before: 5-6)."""
    bm = BlockManager(-(-(4096 * 8 + 128 * 8 + 1024) // 16), 16)
    p = SamplingParams(num_paths=1, max_path_tokens=4096, temperature=0, min_finished_paths=1)
    for round_ in range(2):
        reqs = [Request(f"{round_}-{i}", i, [7] * 128, p, CTRL, TEMPLATE) for i in range(8)]
        for _ in range(0, 4096 - 128, 16):
            for req in reqs:
                req.paths[0].tokens += [9] * 16
                req.allocate(bm)
        bm.take_copies()
        contexts = [req.context(req.paths[0], len(req.paths[0].tokens)) for req in reqs]
        for req, context in zip(reqs, contexts):
            expected = list(range(req.prompt.runs[0][0], req.prompt.runs[0][0] + 128)) + req.paths[0].slots
            assert [a + i for a, n in context for i in range(n)] == expected
        for req in reqs:
            req.free(bm)
    assert [len(c) for c in contexts] == [1] * 8


def test_block_copies_are_made_in_order(llm):
    """ModelRunner.copy_blocks equals copying block by block in the order given, also when a
    later copy writes a block an earlier one read (5 -> 3, then 7 -> 5) or reads a block an
    earlier one wrote (10 -> 11, then 11 -> 12)."""
    runner, bs = llm.engine.runner, llm.engine.block_size
    cache = runner.kv_cache
    cache.k.normal_()
    cache.v.normal_()
    copies = [(5, 3), (6, 4), (7, 5), (10, 11), (11, 12), (0, 20), (1, 21)]
    expected = [cache.k.clone(), cache.v.clone()]
    for pool in expected:
        for a, b in copies:
            pool[:, :, b * bs:(b + 1) * bs] = pool[:, :, a * bs:(a + 1) * bs].clone()
    runner.copy_blocks(copies, bs)
    assert torch.equal(cache.k, expected[0]) and torch.equal(cache.v, expected[1])
