"""The engine side of issue 16: n samples of one prompt sharing its KV (`SampleGroup`), ending a
sample early (`stop_sample`), and logprobs of the distribution actually sampled from
(`sampler.logprobs_rows`), against independent references."""

from __future__ import annotations

import math
import random

import pytest
import torch
from tests.engine.test_sampler import reference_probs

from parathinker import LLM, SamplingParams
from parathinker.engine.request import FINISHED
from parathinker.engine.sampler import SamplingTensors, logprobs_rows, sample_rows

QUESTION = "What is 2+3?"


def params(**kw) -> SamplingParams:
    return SamplingParams(**{"num_paths": 3, "max_path_tokens": 12, "max_summary_tokens": 90,
                             "temperature": 0.7, "seed": 11, **kw})


@pytest.fixture(scope="module")
def engine_llm(ckpt_dir):
    return LLM(str(ckpt_dir), device="cpu", dtype="float32", num_kv_blocks=256)


def alone(llm, ids, p):
    (out,) = llm.generate(prompt_token_ids=[ids], params=p)
    return out


def test_n_samples_share_the_prompt_kv_and_equal_their_own_requests(engine_llm):
    llm = engine_llm
    ids = llm.tokenizer.encode(llm.format_prompt(QUESTION))
    group = llm.engine.add_request("g", ids, params(), n=4)
    llm.engine.step()
    bm = llm.engine.block_manager
    assert len(group.prompt.blocks) == -(-len(ids) // bm.block_size)
    assert all(bm.ref_counts[b] == 1 + 4 * 3 for b in group.prompt.blocks)  # prompt + 12 paths
    assert group.num_forward_tokens == len(ids) + 4 * 3  # the prompt once, one tag per path
    llm.engine.run_to_completion()
    assert bm.num_used == 0 and group.status == FINISHED
    for i, m in enumerate(group.members):
        out, ref = llm.request_output(m), alone(llm, ids, params(seed=11 + i))
        assert out.summary.token_ids == ref.summary.token_ids
        assert [p.token_ids for p in out.paths] == [p.token_ids for p in ref.paths]


def test_groups_survive_preemption_unchanged(ckpt_dir, engine_llm):
    """A pool too small for both groups at once: they preempt each other (all their blocks
    freed, recomputed later) and still give every sample's own tokens."""
    small = LLM(str(ckpt_dir), device="cpu", dtype="float32", num_kv_blocks=150, block_size=4)
    ids = [small.tokenizer.encode(small.format_prompt(q)) for q in (QUESTION, "What is 7*8?")]
    groups = [small.engine.add_request(f"g{j}", x, params(seed=3 + 10 * j), n=2)
              for j, x in enumerate(ids)]
    small.engine.run_to_completion()
    assert all(g.status == FINISHED for g in groups)
    assert sum(g.num_preemptions for g in groups) > 0
    assert small.engine.block_manager.num_used == 0
    for j, g in enumerate(groups):
        for i, m in enumerate(g.members):
            out = small.request_output(m)
            ref = alone(engine_llm, ids[j], params(seed=3 + 10 * j + i))
            assert out.summary.token_ids == ref.summary.token_ids


def test_stop_sample_ends_one_sample_and_leaves_the_others(engine_llm):
    llm = engine_llm
    ids = llm.tokenizer.encode(llm.format_prompt(QUESTION))
    group = llm.engine.add_request("s", ids, params(temperature=1.0), n=2)
    while group.members[1].summary is None:
        llm.engine.step()
    llm.engine.step()
    llm.engine.stop_sample("s", 1)
    stopped = list(group.members[1].summary.tokens)
    llm.engine.run_to_completion()
    assert group.members[1].summary.tokens == stopped  # nothing sampled after the stop
    assert llm.request_output(group.members[1]).summary.finish_reason == "stop"
    ref = alone(llm, ids, params(temperature=1.0))
    assert llm.request_output(group.members[0]).summary.token_ids == ref.summary.token_ids
    single = llm.engine.add_request("t", ids, params())
    while single.summary is None:
        llm.engine.step()
    llm.engine.stop_sample("t")
    assert [r.request_id for r in llm.engine.step()] == ["t"]
    assert single.status == FINISHED and llm.engine.block_manager.num_used == 0


def _blocks(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def _own(m) -> list:
    return [*m.paths, *([m.summary] if m.summary else [])]


def _held(group, members, block_size: int) -> int:
    """Blocks that the prompt and `members`' own paths and summaries fill (SPEC: a path reads
    the prompt's blocks, shared; its own tokens and the summary's take blocks of their own)."""
    own = [s for m in members for s in _own(m)]
    return _blocks(len(group.prompt.tokens), block_size) + sum(_blocks(s.num_placed, block_size) for s in own)


def test_a_sample_that_ends_gives_its_blocks_back_before_its_group_ends(engine_llm):
    llm = engine_llm
    engine, bs = llm.engine, llm.engine.block_size
    ids = llm.tokenizer.encode(llm.format_prompt(QUESTION))
    group = engine.add_request("e", ids, params(temperature=1.0, seed=5), n=4)
    num_early_ends = 0
    while group.status != FINISHED:
        # a step places every token sampled before it, then samples: what each sample fills in it
        filled = {id(m): sum(_blocks(len(s.tokens), bs) for s in _own(m)) for m in group.live()}
        engine.step()
        if group.status == FINISHED:
            break
        live = [m for m in group.members if m.status != FINISHED]
        ended_now = [m for m in group.members if m.status == FINISHED and id(m) in filled]
        used = engine.load().num_kv_blocks_used
        assert used == _held(group, live, bs)  # the ended samples hold nothing
        num_early_ends += len(ended_now)
        assert all(filled[id(m)] > 0 for m in ended_now)  # ... and did hold blocks before
    assert num_early_ends >= 1, "no sample ended before its group: the test shows nothing"
    assert engine.block_manager.num_used == 0
    for i, m in enumerate(group.members):  # the same tokens as each sample's own request
        out, ref = llm.request_output(m), alone(llm, ids, params(temperature=1.0, seed=5 + i))
        assert out.summary.token_ids == ref.summary.token_ids
        assert [p.token_ids for p in out.paths] == [p.token_ids for p in ref.paths]


def test_a_stopped_sample_gives_its_blocks_back_at_once(engine_llm):
    llm = engine_llm
    engine, bs = llm.engine, llm.engine.block_size
    ids = llm.tokenizer.encode(llm.format_prompt(QUESTION))
    group = engine.add_request("f", ids, params(temperature=1.0), n=3)
    while group.members[0].summary is None:
        engine.step()
    before = engine.load().num_kv_blocks_used
    mine = _held(group, group.members, bs) - _held(group, group.members[1:], bs)
    engine.stop_sample("f", 0)
    assert mine > 0 and engine.load().num_kv_blocks_used == before - mine
    engine.run_to_completion()
    assert engine.block_manager.num_used == 0


def test_logprobs_only_when_asked(engine_llm):
    llm = engine_llm
    ids = llm.tokenizer.encode(llm.format_prompt(QUESTION))
    plain = llm.engine.add_request("a", ids, params())
    asked = llm.engine.add_request("b", ids, params(), logprobs=2)
    llm.engine.run_to_completion()
    assert plain.summary.logprobs == {} and all(p.logprobs == {} for p in plain.paths)
    assert all(p.logprobs == {} for p in asked.paths)  # paths only with path_logprobs
    # every token after <summary>: the forced template's too (scored in its forward), then the
    # sampled ones
    assert sorted(asked.summary.logprobs) == list(range(1, len(asked.summary.tokens)))
    assert plain.summary.tokens == asked.summary.tokens  # asking changes no token
    for i, (lp, top_ids, top_lps) in asked.summary.logprobs.items():
        assert len(top_ids) == len(top_lps) == 2 and top_lps[0] >= top_lps[1]
        assert lp <= top_lps[0]
        token = asked.summary.tokens[i]
        if token in top_ids:
            assert lp == top_lps[top_ids.index(token)]


@pytest.mark.parametrize("temperature,top_p,top_k", [(0.0, 1.0, 0), (0.8, 1.0, 0),
                                                     (1.3, 0.7, 0), (0.6, 1.0, 4),
                                                     (1.0, 0.9, 6)])
def test_logprobs_rows_are_the_documented_filtered_distribution(temperature, top_p, top_k):
    rng = random.Random(int(temperature * 10) + top_k)
    rows = [[rng.gauss(0, 2) for _ in range(40)] for _ in range(5)]
    rows[0][7] = -math.inf  # a banned token
    logits = torch.tensor(rows)
    st = SamplingTensors.from_rows([temperature] * 5, [top_p] * 5, [top_k] * 5,
                                   list(range(5)), [9] * 5, "cpu")
    tokens = sample_rows(logits.clone(), st)
    chosen, top_ids, top_lps = logprobs_rows(logits.clone(), st, tokens, 5)
    for r, row in enumerate(rows):
        probs = reference_probs(row, temperature or 1.0, top_p, top_k)  # greedy: temperature 1
        lp = {v: math.log(p) for v, p in probs.items() if p > 0}
        assert chosen[r].item() == pytest.approx(lp[tokens[r].item()], abs=1e-5)
        best = sorted(lp.items(), key=lambda x: -x[1])[:5]
        got = [x for x in zip(top_ids[r].tolist(), top_lps[r].tolist()) if x[1] > -math.inf]
        assert [v for v, _ in got] == [v for v, _ in best]
        assert [x for _, x in got] == pytest.approx([x for _, x in best], abs=1e-5)
        if temperature == 0:
            assert top_ids[r, 0].item() == tokens[r].item()
