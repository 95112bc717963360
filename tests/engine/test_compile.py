"""The graph path (LLM(compile=True), engine.graphs): greedy tokens equal the eager engine's and
the slow twin's, token for token in float32, over prompt lengths, batch sizes, path counts and
samples; two compiled graphs (batch 1, any other bucket) whatever the context width, no graph
break (fullgraph=True raises on one); a decode step's logits equal the eager step's; prefill and
mixed steps stay eager. One compiled LLM per module: a cold compile takes 10-20 s on CPU."""

import pytest
import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.utils import counters

from parathinker import LLM, SamplingParams
from parathinker.attention.paged import backend_for
from parathinker.attention.static_decode import StaticDecode, width_bucket
from parathinker.engine.graphs import BATCH_BUCKETS, MAX_PADDED_SLOTS, DecodeGraphs
from parathinker.engine.request import SeqWork

QUESTIONS = ["What is 2+3?", "Find x if 2x + 3 = 11.", "Let me check 7*3 mod 10.", "abc",
             "Sum the numbers 1, 2, 3, 4, 5, 6, 7, 8, 9 and 10, then halve it."]


def params(**kw):
    return SamplingParams(**dict(dict(max_path_tokens=14, max_summary_tokens=84, temperature=0.0), **kw))


def tokens(out):
    assert out.error is None
    return ([p.token_ids for p in out.paths], [p.finish_reason for p in out.paths],
            out.summary.token_ids, out.summary.finish_reason)


@pytest.fixture(scope="module")
def compiled(ckpt_dir):
    torch._dynamo.reset()  # count this module's graphs only
    counters.clear()
    llm = LLM(str(ckpt_dir), device="cpu", dtype="float32", compile=True)
    shapes = []  # (batch bucket, context width) of every graph-path step
    forward = llm.engine.runner.graphs.forward

    def record(*inputs):
        shapes.append((inputs[0].shape[0], inputs[4].shape[1]))
        return forward(*inputs)

    llm.engine.runner.graphs.forward = record
    llm.shapes = shapes
    return llm


def test_greedy_tokens_equal_eager_and_slow_twin(compiled, llm):
    assert compiled.engine.runner.compiled and not llm.engine.runner.compiled
    for qs, p in ((QUESTIONS[:1], params(num_paths=1)), (QUESTIONS, params(num_paths=3)),
                  (QUESTIONS[:2], params(num_paths=4, min_finished_paths=4))):
        got = compiled.generate(qs, p)
        for a, b, c in zip(got, llm.generate(qs, p), compiled.generate_slow_twin(qs, p)):
            assert tokens(a) == tokens(b) == tokens(c)
    assert compiled.engine.block_manager.num_used == 0


def test_samples_and_mixed_path_counts_in_one_batch(compiled, llm):
    """n = 2 samples sharing a prompt next to requests of 1..4 paths and a long prompt."""
    prompts = compiled.encode_prompts(QUESTIONS[:4], None) + [list(range(40, 140))]
    configs = [params(num_paths=k, min_finished_paths=1 + k // 2) for k in (1, 2, 4, 3, 2)]
    outs = {}
    for name, m in (("compiled", compiled), ("eager", llm)):
        engine = m.engine
        reqs = [engine.add_request(f"{name}-{i}", ids, p) for i, (ids, p) in
                enumerate(zip(prompts, configs))]
        group = engine.add_request(f"{name}-n2", prompts[0], params(num_paths=2), n=2)
        engine.run_to_completion()
        outs[name] = [tokens(m.request_output(r)) for r in reqs + group.members]
    assert outs["compiled"] == outs["eager"]
    for ids, p, got in zip(prompts, configs, outs["compiled"]):
        assert got == tokens(compiled.generate_slow_twin(prompt_token_ids=[ids], params=p)[0])


def test_prefill_through_the_gathered_backend(compiled):
    """The graph path under another prefill backend (the runs one is the CPU default above; flex
    needs a zeroed pool: tests/engine/test_gpu_compile.py runs it on CUDA)."""
    runner = compiled.engine.runner
    runs = runner.backend
    runner.backend = backend_for("gathered", "cpu")
    try:
        p = params(num_paths=3, min_finished_paths=2)
        qs = QUESTIONS[:3]
        for a, b in zip(compiled.generate(qs, p), compiled.generate_slow_twin(qs, p)):
            assert tokens(a) == tokens(b)
    finally:
        runner.backend = runs


def test_two_graphs_over_buckets_and_widths_no_breaks(compiled):
    """Buckets 1, 2 and 4 and two widths by construction: each request's paths run in lockstep
    to their fixed length (min_path_tokens, every path awaited), one over a 300-token prompt."""
    short, long = compiled.encode_prompts(QUESTIONS[:1], None)[0], list(range(10, 310))
    for k, ids in ((1, short), (2, short), (4, long)):
        compiled.generate(prompt_token_ids=[ids], params=params(
            num_paths=k, min_finished_paths=k, max_path_tokens=12, min_path_tokens=12))
    entries = _debug_get_cache_entry_list(DecodeGraphs._forward.__code__)
    buckets = {b for b, _ in compiled.shapes}
    widths = {w for _, w in compiled.shapes}
    assert len(buckets) >= 3 and len(widths) >= 2, compiled.shapes  # the workload varied both
    graphs = (1 in buckets) + any(b > 1 for b in buckets)  # batch 1; every other bucket
    assert len(entries) == graphs <= 16 and counters["stats"]["unique_graphs"] == graphs
    assert not counters["graph_break"]


def test_decode_step_logits_equal_the_eager_step(compiled):
    """Sequences reading several runs (a summary reads the prompt and two paths), written by an
    eager prefill; the same decode step through the graph path and the eager runner."""
    runner = compiled.engine.runner
    work = lambda ids, start, ctx, seg: SeqWork(ids, list(range(start, start + len(ids))), seg,  # noqa: E731
                                                ctx, True, None)
    prompt, p1, p2 = list(range(30, 50)), [7, 8, 9, 10, 11, 12, 13], [14, 15, 16, 17, 18, 19]
    runner.run([work(prompt, 0, [(0, 20)], 0)])
    runner.run([work(p1, 20, [(0, 20), (64, 7)], 1), work(p2, 20, [(0, 20), (128, 6)], 2)])
    decode = [work([21], 27, [(0, 20), (64, 8)], 1), work([22], 26, [(0, 20), (128, 7)], 2),
              work([23], 34, [(0, 20), (64, 7), (128, 6), (192, 1)], 3)]
    decode[1].needs_logits, decode[1].forced = False, [0]  # a forced token's logits: last
    assert DecodeGraphs.takes(decode)
    steps = runner.graphs.num_steps
    fast = runner.run(decode)
    assert runner.graphs.num_steps == steps + 1
    graphs, runner.graphs = runner.graphs, None
    try:
        slow = runner.run(decode)
    finally:
        runner.graphs = graphs
    assert fast.shape == slow.shape == (3, compiled.model.vocab_size)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_prefill_and_mixed_steps_stay_eager(compiled):
    runner = compiled.engine.runner
    kinds = []
    run, graph_run = runner.run, runner.graphs.run

    def record(work):
        kinds.append("decode" if all(len(w.token_ids) == 1 for w in work) else "mixed")
        return run(work)

    def graph_record(work):
        kinds.append("graph")
        return graph_run(work)

    runner.run, runner.graphs.run = record, graph_record
    try:
        compiled.generate(QUESTIONS[:2], params(num_paths=2))
    finally:
        del runner.run, runner.graphs.run
    assert "mixed" in kinds and "decode" in kinds
    for i, kind in enumerate(kinds):  # every decode step, and only those, took the graph path
        if kind == "decode":
            assert kinds[i + 1] == "graph"
        if kind == "mixed":
            assert i + 1 == len(kinds) or kinds[i + 1] != "graph"
    one = SeqWork([5], [3], 0, [(0, 4)], True, None)
    assert not DecodeGraphs.takes([one] * (BATCH_BUCKETS[-1] + 1))  # past the largest bucket
    assert not DecodeGraphs.takes([one, SeqWork([5, 6], [3, 4], 0, [(0, 5)], True, None)])
    long = SeqWork([5], [3], 0, [(0, MAX_PADDED_SLOTS // 2 + 1)], True, None)  # 5/8 of the max
    assert DecodeGraphs.takes([long]) and not DecodeGraphs.takes([long, one])


def test_static_decode_metadata():
    """Runs expanded into padded slot rows; values typed in."""
    meta = StaticDecode.build([[(3, 2), (10, 3)], [(40, 1)]], batch=4, scratch=99, device="cpu")
    assert meta.slots.shape == (4, 64)  # the width: at least 64
    assert meta.slots[0, :6].tolist() == [3, 4, 10, 11, 12, 99]
    assert meta.slots[1, :2].tolist() == [40, 99]
    assert set(meta.slots[2:].flatten().tolist()) == {99}
    assert meta.lengths.tolist() == [5, 1, 1, 1]
    assert meta.slot_mapping.tolist() == [12, 40, 99, 99]
    wide = StaticDecode.build([[(0, 65)]], batch=1, scratch=99, device="cpu")
    assert wide.slots.shape == (1, 80) and wide.slots[0, 64].item() == 64  # 64 + 64 / 4
    # widths: n rounded up to a quarter of the power of two below it, so padding < n / 4
    for n, w in [(64, 64), (80, 80), (81, 96), (4096, 4096), (4097, 5120), (4225, 5120),
                 (7169, 8192), (16513, 20480)]:
        assert width_bucket(n) == w
        assert n <= w < n * 1.25
    with pytest.raises(ValueError, match="batch bucket"):
        StaticDecode.build([[(0, 1)]] * 3, batch=2, scratch=99, device="cpu")


def test_bad_compile_arguments(ckpt_dir):
    with pytest.raises(ValueError, match="compile must be"):
        LLM(str(ckpt_dir), device="cpu", compile="yes")
    with pytest.raises(ValueError, match="linear='packed' cannot be compiled"):
        LLM(str(ckpt_dir), device="cpu", compile=True, linear="packed")


def test_a_compiled_step_that_fails_leaves_eager_with_the_same_logits(compiled, monkeypatch):
    """A compiler error on a user's machine (e.g. an untested GPU stack) must not fail the
    request: the step is decoded eagerly, and the graph path stays off from then on."""
    runner = compiled.engine.runner
    work = [SeqWork([21], [20], 0, [(0, 21)], True, None),
            SeqWork([22], [20], 1, [(64, 21)], True, None)]
    runner.run([SeqWork(list(range(30, 50)), list(range(20)), 0, [(0, 20)], True, None)])
    runner.run([SeqWork(list(range(30, 50)), list(range(20)), 1, [(64, 20)], True, None)])
    graphs, runner.graphs = runner.graphs, None
    try:
        eager = runner.run(work)
    finally:
        runner.graphs = graphs

    def broken(*inputs):
        raise RuntimeError("backend compiler failed")

    monkeypatch.setattr(graphs, "forward", broken)
    monkeypatch.setattr(graphs, "cuda_graphs", False)
    steps = graphs.num_steps
    try:
        torch.testing.assert_close(runner.run(work), eager, rtol=0, atol=0)
        assert graphs.failed and graphs.num_steps == steps
        torch.testing.assert_close(runner.run(work), eager, rtol=0, atol=0)  # eager again
    finally:
        graphs.failed = False
