"""Prepacked (oneDNN) and int8 linears against plain F.linear on the same weights."""

import os

import pytest
import torch
import torch.nn.functional as F

from parathinker import LLM, SamplingParams
from parathinker.attention.dense import DenseAttention
from parathinker.model import load_model
from parathinker.model.fast_linear import (CHUNK_ROWS, EXACT_ROWS, PackedLinear, can_prepack,
                                           padded_rows, prepack_linears, quantize_int8)

# row counts around each threshold: exact, padded, the old 256-row chunks, one call, in chunks
THRESHOLD_ROWS = (1, 7, 16, 17, 19, 33, 100, 255, 256, 257, 700, 4095, 4096, CHUNK_ROWS - 1,
                  CHUNK_ROWS, CHUNK_ROWS + 1, 2 * CHUNK_ROWS + 3)
needs_onednn = pytest.mark.skipif(not can_prepack(torch.nn.Linear(2, 2)),
                                  reason="no oneDNN on this CPU build")


def logits(model, n=24):
    ids = (torch.arange(n)[None] * 7) % 200 + 20
    mask = torch.tril(torch.ones(n, n, dtype=torch.bool))[None]
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(n)[None], ids % 3, DenseAttention(mask)))


@needs_onednn
def test_packed_equals_plain(ckpt_dir):
    plain, packed = load_model(ckpt_dir), load_model(ckpt_dir)
    num = prepack_linears(packed)
    assert num == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer + lm_head
    assert isinstance(packed.lm_head, PackedLinear)
    assert (logits(plain) - logits(packed)).abs().max().item() <= 1e-4


def test_int8_is_close_and_generates(ckpt_dir):
    plain, q = load_model(ckpt_dir), load_model(ckpt_dir)
    assert quantize_int8(q) == 15
    a, b = logits(plain), logits(q)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
    llm = LLM(str(ckpt_dir), device="cpu", dtype="float32", linear="int8")
    (out,) = llm.generate(["What is 2+3?"], SamplingParams(num_paths=2, max_path_tokens=8,
                                                            max_summary_tokens=80, temperature=0))
    assert llm.linear_backend == "int8" and len(out.paths) == 2 and out.error is None


@pytest.mark.parametrize("kw,match", [(dict(linear="fast"), "unknown linear backend"),
                                      (dict(linear="packed", dtype="bfloat16"), "float32")])
def test_bad_linear_backend(ckpt_dir, kw, match):
    with pytest.raises(ValueError, match=match):
        LLM(str(ckpt_dir), **{"device": "cpu", "dtype": "float32", **kw})


def test_padded_rows_few_sizes_little_padding():
    sizes = [padded_rows(m) for m in range(1, CHUNK_ROWS + 1)]
    assert sizes[:16] == list(range(1, 17))                     # a few rows: as they are
    assert all(m <= p <= m + m // 8 for m, p in enumerate(sizes, 1))  # at most 1/8 extra
    octaves = CHUNK_ROWS.bit_length() - EXACT_ROWS.bit_length()  # powers of two above EXACT_ROWS
    assert len(set(sizes)) == EXACT_ROWS + 8 * octaves == 88     # not one oneDNN shape per count
    assert max(sizes) == CHUNK_ROWS
    assert padded_rows(17) == 18 and padded_rows(33) == 36 and padded_rows(200) == 208


@needs_onednn
def test_packed_rows_padded_equal_plain():
    torch.manual_seed(0)
    plain = torch.nn.Linear(32, 48)
    packed = PackedLinear(plain)
    with torch.no_grad():
        for m in THRESHOLD_ROWS:
            x = torch.randn(m, 32)
            assert (packed(x) - F.linear(x, plain.weight, plain.bias)).abs().max().item() <= 1e-5
        x = torch.randn(2, 300, 32)  # leading dimensions flattened into rows and back
        y = packed(x)
        assert y.shape == (2, 300, 48) and (y - plain(x)).abs().max().item() <= 1e-5


def onednn_calls(fn) -> tuple[int, int]:
    """(oneDNN linear calls, aten::cat calls) that fn() makes, counted by the torch profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    counts = {e.key: e.count for e in prof.key_averages()}
    return counts.get("mkldnn::_linear_pointwise", 0), counts.get("aten::cat", 0)


@needs_onednn
def test_packed_rows_up_to_chunk_rows_are_one_call():
    # many small calls and the cat of their outputs cost a prefill ~2x on a loaded CPU (issue 25):
    # up to CHUNK_ROWS rows (the engine's default step budget) are one call, padded at most
    packed = PackedLinear(torch.nn.Linear(16, 24))
    with torch.inference_mode():
        for m in (257, 1000, 4096, CHUNK_ROWS):
            x, r = torch.zeros(m, 16), torch.zeros(m, 24)
            pads = int(padded_rows(m) != m)
            assert onednn_calls(lambda: packed(x)) == (1, pads)
            assert onednn_calls(lambda: packed.forward_add(x, r)) == (1, 2 * pads)
        x = torch.zeros(CHUNK_ROWS + 1, 16)
        assert onednn_calls(lambda: packed(x)) == (2, 1)  # two chunks (the 1-row one exact), cat


def rss_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not can_prepack(torch.nn.Linear(2, 2)) or not os.path.exists("/proc/self/statm"),
                    reason="no oneDNN on this CPU build, or no /proc")
def test_packed_memory_flat_over_row_counts():
    # oneDNN builds and caches a primitive (~0.6 MB) per input shape; unpadded, every new row
    # count grew the process (a server by hundreds of MB, issue 22). Once the padded sizes are
    # built, 600 distinct row counts add nothing.
    packed = PackedLinear(torch.nn.Linear(128, 512))
    with torch.inference_mode():
        for m in sorted({padded_rows(k) for k in range(1, 601)}):
            packed(torch.zeros(m, 128))
            packed.forward_add(torch.zeros(m, 128), torch.zeros(m, 512))  # the fused layer's call
        before = rss_mb()
        for m in range(1, 601):
            packed(torch.zeros(m, 128))
            packed.forward_add(torch.zeros(m, 128), torch.zeros(m, 512))
    assert rss_mb() - before < 32


def test_packed_forward_add_equals_linear_plus_residual_at_padded_and_chunked_counts():
    linear = torch.nn.Linear(64, 96)
    packed = PackedLinear(linear)
    for m in THRESHOLD_ROWS:
        x, r = torch.randn(m, 64), torch.randn(m, 96)
        with torch.inference_mode():
            want = F.linear(x, linear.weight, linear.bias) + r
            torch.testing.assert_close(packed.forward_add(x, r), want, rtol=1e-5, atol=1e-5)
