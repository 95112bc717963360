"""The engine on CUDA (marked `gpu`, skipped without it): greedy float32 outputs equal the
slow twin token for token through every backend, with the KV pool sized by
profiling; seeded sampling gives the same tokens as on CPU for the same request."""

import pytest
import torch

from parathinker import LLM, SamplingParams
from parathinker.attention.paged import BACKENDS
from tests import GPU_KV_BYTES

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

QUESTIONS = ["What is 2+3?", "Find x if 2x + 3 = 11.", "Let me check 7*3 mod 10.", "abc"]


def same(a, b):
    assert [p.token_ids for p in a.paths] == [p.token_ids for p in b.paths]
    assert a.summary.token_ids == b.summary.token_ids and a.error is None and b.error is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_cuda_matches_reference(ckpt_dir, backend):
    llm = LLM(str(ckpt_dir), device="cuda", dtype="float32", attention=backend,
              kv_cache_memory=GPU_KV_BYTES)
    assert llm.engine.runner.attention == backend
    p = SamplingParams(num_paths=4, max_path_tokens=14, max_summary_tokens=84, temperature=0.0)
    for a, b in zip(llm.generate(QUESTIONS, p), llm.generate_slow_twin(QUESTIONS, p)):
        same(a, b)
    assert llm.engine.block_manager.num_used == 0


def test_auto_is_flex_and_the_pool_is_profiled(ckpt_dir):
    llm = LLM(str(ckpt_dir), device="cuda", dtype="bfloat16")
    assert llm.engine.runner.attention == "flex"
    free, total = torch.cuda.mem_get_info()
    assert llm.engine.block_manager.num_blocks > 0 and free > 0.01 * total


def test_seeded_sampling_cuda_equals_cpu(ckpt_dir):
    p = SamplingParams(num_paths=3, max_path_tokens=14, max_summary_tokens=84, temperature=1.0,
                       top_p=0.9, top_k=40, seed=5)
    gpu = LLM(str(ckpt_dir), device="cuda", dtype="float32", kv_cache_memory=GPU_KV_BYTES)
    gpu = gpu.generate(QUESTIONS[:1], p)[0]
    cpu = LLM(str(ckpt_dir), device="cpu", dtype="float32").generate(QUESTIONS[:1], p)[0]
    same(gpu, cpu)  # same logits to float32 rounding, same counter-based noise
