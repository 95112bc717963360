"""The batched engine equals the slow twin token for token (greedy, float32), through
every attention backend that runs on this machine ("flex" compiles FlexAttention on CPU too)."""

import pytest

from parathinker.testing.checkpoints import make_checkpoint

from parathinker import LLM, SamplingParams
from parathinker.attention.paged import BACKENDS

QUESTIONS = ["What is 2+3?", "Find x if 2x + 3 = 11.", "Let me check 7*3 mod 10.", "abc", "Sum 1..10"]


def params(**kw):
    base = dict(max_path_tokens=14, max_summary_tokens=84, temperature=0.0)
    base.update(kw)
    return SamplingParams(**base)


def same(a, b):
    assert [p.token_ids for p in a.paths] == [p.token_ids for p in b.paths]
    assert [p.finish_reason for p in a.paths] == [p.finish_reason for p in b.paths]
    assert a.summary.token_ids == b.summary.token_ids
    assert a.summary.finish_reason == b.summary.finish_reason
    assert a.answer == b.answer and a.error is None and b.error is None


@pytest.fixture(scope="module", params=BACKENDS)
def llm(request, ckpt_dir):
    return LLM(str(ckpt_dir), device="cpu", dtype="float32", attention=request.param)


@pytest.fixture(scope="module", params=BACKENDS)
def small_pool(request, ckpt_dir):
    return LLM(str(ckpt_dir), device="cpu", dtype="float32", block_size=4, num_kv_blocks=48,
               summary_template="<summary>The final answer is", attention=request.param)


def test_single_request_matches_reference(llm):
    for p in (params(num_paths=1), params(num_paths=4), params(num_paths=4, min_finished_paths=4)):
        same(llm.generate(QUESTIONS[:1], p)[0], llm.generate_slow_twin(QUESTIONS[:1], p)[0])


def test_many_requests_at_once_match_reference(llm):
    p = params(num_paths=3, min_finished_paths=2)
    for a, b in zip(llm.generate(QUESTIONS, p), llm.generate_slow_twin(QUESTIONS, p)):
        same(a, b)
    assert llm.engine.block_manager.num_used == 0


def test_mixed_num_paths_in_one_batch(llm):
    engine = llm.engine
    configs = [params(num_paths=k, min_finished_paths=1 + k // 2) for k in (1, 2, 4, 3, 8)]
    prompts = llm.encode_prompts(QUESTIONS, None)
    reqs = [engine.add_request(f"mixed-{i}", ids, p) for i, (ids, p) in enumerate(zip(prompts, configs))]
    engine.run_to_completion()
    assert engine.num_steps > 0
    for req, ids, p in zip(reqs, prompts, configs):
        same(llm.request_output(req), llm.generate_slow_twin(prompt_token_ids=[ids], params=p)[0])


def test_forced_preemption_keeps_results(small_pool):
    llm = small_pool
    prompts = [[5 + i, 40, 41 + i, 60, 61, 62 + i, 70] for i in range(12)]
    p = params(num_paths=3, max_path_tokens=12, max_summary_tokens=16, min_finished_paths=3)
    outs = llm.generate(prompt_token_ids=prompts, params=p)
    assert sum(o.metrics["num_preemptions"] for o in outs) > 0, "the pool was meant to be too small"
    for o, ids in zip(outs, prompts):
        same(o, llm.generate_slow_twin(prompt_token_ids=[ids], params=p)[0])
    bm = llm.engine.block_manager
    assert bm.num_used == 0 and not any(bm.ref_counts) and bm.peak_used <= bm.num_blocks


def test_request_too_big_for_the_pool_fails_alone(small_pool):
    llm = small_pool
    ok = params(num_paths=2, max_path_tokens=8, max_summary_tokens=16)
    big_prompt = list(range(30, 30 + 4 * 48 + 1))  # more tokens than the pool has slots
    outs = llm.generate(prompt_token_ids=[[5, 6, 7], big_prompt, [8, 9]], params=ok)
    assert outs[1].error and "KV blocks" in outs[1].error and "num_kv_blocks" in outs[1].error
    for i in (0, 2):
        assert outs[i].error is None and outs[i].summary.token_ids
    assert llm.engine.block_manager.num_used == 0


def test_abort_frees_blocks_at_once(llm):
    engine = llm.engine
    ids = llm.encode_prompts(QUESTIONS[:2], None)
    p = params(num_paths=4, max_path_tokens=200, min_path_tokens=200, max_summary_tokens=300)
    engine.add_request("keep", ids[0], params(num_paths=2))
    engine.add_request("drop", ids[1], p)
    engine.step()
    engine.step()
    used = engine.block_manager.num_used
    assert used > 0
    req = engine.abort("drop")
    assert req is not None and req.status == "aborted"
    assert engine.block_manager.num_used < used
    ended = engine.run_to_completion()
    assert {r.request_id for r in ended} == {"keep", "drop"}
    assert engine.block_manager.num_used == 0 and engine.abort("nope") is None


def test_seeded_sampling_matches_reference(llm):
    """One generator per request, consumed in the reference's order: batching changes nothing."""
    p = SamplingParams(num_paths=3, max_path_tokens=12, max_summary_tokens=84, temperature=1.0,
                       top_p=0.95, seed=11)
    for a, b in zip(llm.generate(QUESTIONS[:3], p), llm.generate_slow_twin(QUESTIONS[:3], p)):
        same(a, b)


def naive_plain_greedy(model, prompt, max_tokens, eos):
    """Full recompute, no cache: the obviously-correct twin of plain decoding."""
    import torch

    from parathinker.attention.dense import DenseAttention

    ids = list(prompt)
    while len(ids) - len(prompt) < max_tokens:
        n = len(ids)
        t = torch.tensor([ids])
        mask = torch.tril(torch.ones(n, n, dtype=torch.bool))[None]
        with torch.no_grad():
            h = model(t, torch.arange(n)[None], torch.zeros_like(t), DenseAttention(mask))
        ids.append(int(model.compute_logits(h[0, -1]).argmax()))
        if ids[-1] == eos:
            break
    return ids[len(prompt):]


def test_plain_traces_match_naive_decoding(llm):
    from parathinker import PlainParams

    p = PlainParams(max_tokens=20, temperature=0.0)
    outs = llm.generate_sequential(QUESTIONS[:3], p)
    mixed = llm.generate(QUESTIONS[:2], params(num_paths=2))  # the engine stays usable after
    assert all(o.error is None for o in mixed)
    for o in outs:
        assert o.token_ids == naive_plain_greedy(llm.model, o.prompt_token_ids, 20, llm.ctrl.eos)
        assert o.finish_reason in ("end", "budget") and o.error is None
    assert llm.tokenizer.decode(outs[0].prompt_token_ids).endswith("<think>\n")


def test_base_model_runs_plain_traces_and_refuses_parallel_thinking(tmp_path):
    """A checkpoint without ParaThinker tokens (DeepSeek-R1-Distill-Qwen-1.5B, say) is the
    sequential / majority baseline: plain traces work, generate() says what is missing."""
    from parathinker import LLM, PlainParams
    from parathinker.testing.tiny import train_tokenizer

    base_tok = train_tokenizer(["What is 2+3? The answer is 5. Think step by step."] * 20,
                               vocab_size=300, with_paths=False)
    llm = LLM(make_checkpoint(tmp_path / "base", tokenizer=base_tok), device="cpu", dtype="float32")
    assert llm.ctrl.max_paths == 0
    (o,) = llm.generate_sequential(["What is 2+3?"], PlainParams(max_tokens=12, temperature=0.0))
    assert o.error is None and o.token_ids == naive_plain_greedy(llm.model, o.prompt_token_ids, 12, llm.ctrl.eos)
    with pytest.raises(ValueError, match="no ParaThinker control tokens.*plain traces only"):
        llm.generate(["What is 2+3?"], params(num_paths=1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_never_written_pool_memory_cannot_leak_into_outputs(ckpt_dir, monkeypatch, backend):
    """A fresh pool may hold anything (torch.empty reuses freed memory): here NaN wherever a
    backend is allowed to leave it unwritten. Flex reads whole pages, masked, so its pool must
    start finite (0 * NaN in P @ V is NaN); the others never read a slot before writing it."""
    from parathinker.attention.pool import PagedKVCache

    allocate = PagedKVCache.allocate.__func__

    def poisoned(cls, *args, zeroed=False, **kw):
        cache = allocate(cls, *args, zeroed=zeroed, **kw)
        if not zeroed:
            cache.k.fill_(float("nan"))
            cache.v.fill_(float("nan"))
        return cache

    monkeypatch.setattr(PagedKVCache, "allocate", classmethod(poisoned))
    llm = LLM(str(ckpt_dir), device="cpu", dtype="float32", num_kv_blocks=64, attention=backend)
    p = params(num_paths=3)
    for a, b in zip(llm.generate(QUESTIONS[:2], p), llm.generate_slow_twin(QUESTIONS[:2], p)):
        same(a, b)


@pytest.mark.parametrize("gather,kernels", [("never", True), ("never", False), ("always", True)])
def test_runs_long_decode_path_matches_reference(ckpt_dir, monkeypatch, gather, kernels):
    """Every decode token through the runs backend's long-context path (no short batch): its
    scores over the context's runs read in place (by the CPU kernels, or the matmuls), or over
    a copy of them, then one softmax."""
    import parathinker.attention.long_decode as long_decode
    import parathinker.attention.runs as runs

    monkeypatch.setattr(long_decode, "USE_NATIVE", kernels)
    monkeypatch.setattr(runs, "BATCH_MAX_CONTEXT", 0)
    monkeypatch.setattr(runs, "GATHER_MIN_RUNS", 10**9 if gather == "never" else 0)
    monkeypatch.setattr(runs, "GATHER_MAX_MEAN_RUN", 10**9)
    llm = LLM(str(ckpt_dir), device="cpu", dtype="float32", block_size=4, num_kv_blocks=96,
              attention="runs")
    p = params(num_paths=4, min_finished_paths=3)
    for a, b in zip(llm.generate(QUESTIONS[:3], p), llm.generate_slow_twin(QUESTIONS[:3], p)):
        same(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_moved_blocks_keep_results(ckpt_dir, monkeypatch, backend):
    """Paths decoding side by side in small blocks collide and move their blocks to one extent
    (BlockManager.move; the runner copies their K/V before the step's forward): the tokens stay
    those of the slow twin. Only the runs backend moves (wants_one_run); the others never do."""
    from parathinker.engine.block_manager import BlockManager

    moved = []
    move = BlockManager.move

    def counted(self, blocks, want):
        out = move(self, blocks, want)
        moved.extend([] if out is None else [len(blocks)])
        return out

    monkeypatch.setattr(BlockManager, "move", counted)
    llm = LLM(str(ckpt_dir), device="cpu", dtype="float32", block_size=2, num_kv_blocks=512,
              attention=backend)
    p = params(num_paths=4, max_path_tokens=40, min_path_tokens=40, min_finished_paths=4,
               max_summary_tokens=84)
    outs = llm.generate(QUESTIONS[:3], p)
    if backend == "runs":
        assert len(moved) > 3 and max(moved) > 4, moved
    else:
        assert moved == [], moved
    for a, b in zip(outs, llm.generate_slow_twin(QUESTIONS[:3], p)):
        same(a, b)


def test_a_step_from_a_second_thread_while_one_runs_is_refused(ckpt_dir):
    """A server's engine thread steps while a test (or user) calls generate on the same LLM:
    the second step raises at once, nothing shared is touched, and the first step and the
    request finish as if alone."""
    import threading

    llm = LLM(str(ckpt_dir), device="cpu", dtype="float32")
    engine, p = llm.engine, params(num_paths=2)
    (alone,) = llm.generate(QUESTIONS[:1], p)
    real_run, inside, go_on = engine.runner.run, threading.Event(), threading.Event()

    def slow_run(work):
        inside.set()
        assert go_on.wait(10)
        return real_run(work)

    engine.runner.run = slow_run
    req = engine.add_request("first", llm.encode_prompts(QUESTIONS[:1], None)[0], p)
    first = threading.Thread(target=engine.step)
    first.start()
    try:
        assert inside.wait(10)
        with pytest.raises(RuntimeError, match="another step is running"):
            engine.step()
    finally:
        go_on.set()
        first.join(10)
        engine.runner.run = real_run
    engine.run_to_completion()
    same(llm.request_output(req), alone)
