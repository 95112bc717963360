"""The graph path on CUDA (marked `gpu`, skipped without it): compile is on by default there and
every decode step replays a captured CUDA graph; greedy float32 tokens equal compile off and the
slow twin token for token; a rerun of the same workload captures nothing new."""

import pytest
import torch

from parathinker import LLM, SamplingParams
from tests import GPU_KV_BYTES

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

QUESTIONS = ["What is 2+3?", "Find x if 2x + 3 = 11.", "Let me check 7*3 mod 10.", "abc"]


def tokens(out):
    assert out.error is None
    return [p.token_ids for p in out.paths], out.summary.token_ids


@pytest.mark.parametrize("attention", ["flex", "runs"])
def test_cuda_graphs_equal_eager_and_slow_twin(ckpt_dir, attention):
    kw = dict(device="cuda", dtype="float32", attention=attention, kv_cache_memory=GPU_KV_BYTES)
    on = LLM(str(ckpt_dir), **kw)  # default: on
    off = LLM(str(ckpt_dir), **kw, compile=False)
    assert on.engine.runner.compiled and not off.engine.runner.compiled
    p = SamplingParams(num_paths=4, max_path_tokens=14, max_summary_tokens=84, temperature=0.0)
    for qs in (QUESTIONS[:1], QUESTIONS):
        for a, b, c in zip(on.generate(qs, p), off.generate(qs, p), on.generate_slow_twin(qs, p)):
            assert tokens(a) == tokens(b) == tokens(c)
    graphs = on.engine.runner.graphs
    assert graphs.cuda_graphs, "a capture failed (see the log)"
    assert graphs.num_steps > 0 and graphs.num_replays == graphs.num_steps
    captured, replays = len(graphs.captured), graphs.num_replays
    on.generate(QUESTIONS, p)
    assert len(graphs.captured) == captured and graphs.num_replays > replays


def test_cuda_graphs_bfloat16_runs(ckpt_dir):
    llm = LLM(str(ckpt_dir), device="cuda", dtype="bfloat16", kv_cache_memory=GPU_KV_BYTES)
    p = SamplingParams(num_paths=3, max_path_tokens=14, max_summary_tokens=84, temperature=0.0)
    outs = llm.generate(QUESTIONS, p)
    assert all(o.error is None and o.summary.token_ids for o in outs)
    graphs = llm.engine.runner.graphs
    assert graphs.cuda_graphs and graphs.num_replays == graphs.num_steps > 0
