"""The runs backend's flash path (prefix pieces in place + the new tokens causally, merged by
log-sum-exp) against a float64 oracle written from the definition, at sizes past the flash
kernel's tiles, in float32 and bfloat16; that a prefill builds no queries x context tensor; and that a
float32 decode token attends over its runs with one softmax (no flash call, no merge)."""

import pytest
import torch
from torch.profiler import profile

import parathinker.attention.long_decode as long_decode
from parathinker.attention.paged import backend_for
from parathinker.attention.pool import PagedKVCache, runs_of
from tests.attention.test_paged_attention import naive

# (context runs, new tokens): a fresh prompt (its own tokens only); a chunk after a prefix in
# another run; a prefix in many short runs (copied out first); a decode token over two runs
CASES = [([(0, 300)], 300),
         ([(400, 500), (1000, 130)], 130),
         (runs_of(list(range(1200, 1600, 2))) + [(1700, 90)], 90),
         ([(0, 300), (1000, 401)], 1)]


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_flash_pieces_match_the_definition(dtype, atol):
    torch.manual_seed(0)
    hq, hkv, d = 8, 2, 32  # GQA: 4 query heads per KV head
    cache = PagedKVCache.allocate(1, 2048, hkv, d, dtype, "cpu")
    cache.k.normal_()
    cache.v.normal_()
    query_lens = [t for _, t in CASES]
    meta = backend_for("runs", "cpu").build_metadata(query_lens, [r for r, _ in CASES], "cpu")
    n = sum(query_lens)
    q = torch.randn(1, n, hq, d, dtype=dtype)
    k, v = torch.randn(1, n, hkv, d, dtype=dtype), torch.randn(1, n, hkv, d, dtype=dtype)
    out = meta.attend(0, q, k, v, cache)[0]
    assert out.dtype == dtype
    start = 0
    for runs, t in CASES:
        ctx = [a + i for a, m in runs for i in range(m)]
        expected = naive(q[0, start:start + t].float(), cache.k[0].float(), cache.v[0].float(), ctx, t)
        assert torch.allclose(out[start:start + t].float(), expected, atol=atol), runs
        start += t


def largest_allocation(backend, t, prefix):
    """Bytes of the largest single allocation while one layer attends: a fresh prompt of t
    tokens, and a chunk of t tokens after a prefix of `prefix` slots."""
    torch.manual_seed(0)
    hq, hkv, d = 4, 1, 16
    cache = PagedKVCache.allocate(1, 2 * t + prefix + 64, hkv, d, torch.float32, "cpu")
    cache.k.normal_()
    cache.v.normal_()
    contexts = [[(0, t)], [(t, prefix), (t + prefix + 64, t)]]
    meta = backend_for(backend, "cpu").build_metadata([t, t], contexts, "cpu")
    q, k, v = torch.randn(1, 2 * t, hq, d), torch.randn(1, 2 * t, hkv, d), torch.randn(1, 2 * t, hkv, d)
    with profile(profile_memory=True) as prof:
        meta.attend(0, q, k, v, cache)
    return max(e.cpu_memory_usage for e in prof.events())


def test_prefill_builds_no_queries_by_context_tensor():
    """A 2048-token prefill (and a chunk after a 1024-slot prefix): no allocation as large as a
    bool T x T mask (the gathered twin builds masks and scores of that size; so did runs)."""
    t = 2048
    assert largest_allocation("runs", t, 1024) < t * t // 2
    assert largest_allocation("gathered", t, 1024) >= t * t  # the measure sees such a tensor


@pytest.mark.parametrize("causal", [False, True])
def test_off_cpu_pieces_equal_the_cpu_flash_kernel(causal):
    """The runs backend off the CPU computes each piece from plain scores: the same output and
    log-sum-exp as the CPU flash kernel (GQA, a causal square piece and an unmasked one)."""
    from parathinker.attention.runs import _plain

    torch.manual_seed(0)
    q = torch.randn(1, 6, 40, 16)
    k, v = torch.randn(1, 2, 40 if causal else 90, 16), torch.randn(1, 2, 40 if causal else 90, 16)
    out, lse = _plain(q, k, v, causal)
    ref_out, ref_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=causal)
    assert torch.allclose(out, ref_out, atol=1e-5) and torch.allclose(lse, ref_lse, atol=1e-5)


def test_flash_copies_a_piece_whose_last_dim_is_strided():
    """The CPU flash kernel reads the last dim as contiguous whatever the strides (K stored
    dims-major, as tried for the pool, has stride S there): `_flash` gives such a piece the
    result of its contiguous copy, which is the definition."""
    from parathinker.attention.runs import _flash

    torch.manual_seed(0)
    q = torch.randn(1, 4, 30, 16)
    k_rows = torch.randn(2, 16, 500)  # K stored dims-major, 500 slots
    k = k_rows.transpose(1, 2)[None, :, 100:190]  # [1, 2, 90, 16], last-dim stride 500
    v = torch.randn(1, 2, 90, 16)
    out, lse = _flash(q, k, v, False)
    ref_out, ref_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k.contiguous(), v, is_causal=False)
    assert torch.allclose(out, ref_out, atol=1e-6) and torch.allclose(lse, ref_lse, atol=1e-6)
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) / 4  # the definition, by hand
    assert torch.allclose(out, scores.softmax(-1) @ v.repeat_interleave(2, 1), atol=1e-5)


@pytest.mark.parametrize("kernels", [True, False])
def test_float32_decode_over_runs_takes_no_flash_call_and_no_merge(kernels, monkeypatch):
    """A decode token over a context of several runs (past the short batch's size): its scores
    of every run into one softmax (no flash call per run, no log-sum-exp merge), equal to the
    definition; by the CPU kernels (attention.native) or their twin, the matmuls."""
    monkeypatch.setattr(long_decode, "USE_NATIVE", kernels)
    torch.manual_seed(0)
    hq, hkv, d = 6, 2, 16
    runs = [(0, 40), (700, 300), (100, 250), (1200, 1)]  # 591 slots, the last one its own
    cache = PagedKVCache.allocate(1, 1300, hkv, d, torch.float32, "cpu")
    cache.k.normal_()
    cache.v.normal_()
    meta = backend_for("runs", "cpu").build_metadata([1], [runs], "cpu")
    q, k, v = torch.randn(1, 1, hq, d), torch.randn(1, 1, hkv, d), torch.randn(1, 1, hkv, d)
    with profile() as prof:
        out = meta.attend(0, q, k, v, cache)[0]
    ops = {e.key for e in prof.events()}
    assert not {"aten::_scaled_dot_product_flash_attention_for_cpu", "aten::logsumexp"} & ops
    ctx = [a + i for a, n in runs for i in range(n)]
    assert torch.allclose(out, naive(q[0], cache.k[0], cache.v[0], ctx, 1), atol=1e-5)


@pytest.mark.parametrize("kernels", [True, False])
def test_float32_decodes_read_each_layer_of_the_pool(kernels, monkeypatch):
    """The step's decode tokens over long contexts, attended layer after layer with the same
    metadata (as the model does; the runs' views of every layer are made once): each layer's
    output is the definition over that layer's K/V, its new K/V written first."""
    monkeypatch.setattr(long_decode, "USE_NATIVE", kernels)
    torch.manual_seed(0)
    layers, hq, hkv, d = 3, 8, 2, 16
    contexts = [[(0, 600), (1500, 301)], [(700, 650), (2000, 1)]]
    cache = PagedKVCache.allocate(layers, 2100, hkv, d, torch.float32, "cpu")
    cache.k.normal_()
    cache.v.normal_()
    meta = backend_for("runs", "cpu").build_metadata([1, 1], contexts, "cpu")
    for layer in range(layers):
        q, k, v = torch.randn(1, 2, hq, d), torch.randn(1, 2, hkv, d), torch.randn(1, 2, hkv, d)
        out = meta.attend(layer, q, k, v, cache)[0]
        for i, runs in enumerate(contexts):
            ctx = [a + j for a, n in runs for j in range(n)]
            assert torch.equal(cache.k[layer][:, ctx[-1]], k[0, i])  # its own slot, this layer's
            expected = naive(q[0, i:i + 1], cache.k[layer], cache.v[layer], ctx, 1)
            assert torch.allclose(out[i:i + 1], expected, atol=1e-5), (layer, i)
