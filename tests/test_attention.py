"""Cache attention (grouped, padded, GQA folded) against per-sequence naive attention."""

import math
import random

import torch

from parathinker.attention.reference import CacheAttention, KVCache, attend


def naive(q, k_all, v_all, ctx, q_len):
    """q: [q_len, Hq, D]; the context's K/V: [C, Hkv, D]; causal among the last q_len."""
    hq, hkv = q.shape[1], k_all.shape[1]
    k = k_all[ctx].repeat_interleave(hq // hkv, dim=1).double()
    v = v_all[ctx].repeat_interleave(hq // hkv, dim=1).double()
    out = []
    for i in range(q_len):
        visible = len(ctx) - q_len + i + 1
        scores = torch.einsum("hd,chd->hc", q[i].double(), k[:visible]) / math.sqrt(q.shape[-1])
        out.append(torch.einsum("hc,chd->hd", scores.softmax(-1), v[:visible]))
    return torch.stack(out).float()


def test_cache_attention_matches_naive():
    rng = random.Random(0)
    torch.manual_seed(0)
    hq, hkv, d, slots = 6, 2, 8, 400
    cache = KVCache.allocate(1, slots, hkv, d, torch.float32, "cpu")
    cache.k.normal_()
    cache.v.normal_()
    shared = list(range(0, 20))  # a "prompt" read by several sequences
    free = iter(range(20, slots))
    query_lens, contexts = [], []
    for ctx_len, q_len in [(3, 3), (25, 1), (26, 1), (90, 7), (5, 2), (200, 1)]:
        own = [next(free) for _ in range(max(ctx_len - len(shared), q_len))]
        ctx = (shared + own)[-max(ctx_len, q_len):] if rng.random() < 0.5 else own
        query_lens.append(q_len)
        contexts.append(ctx)
    meta = CacheAttention.build(query_lens, contexts, "cpu")
    assert len(meta.groups) > 1  # the lengths are spread enough to be padded separately
    n = sum(query_lens)
    q, k, v = torch.randn(1, n, hq, d), torch.randn(1, n, hkv, d), torch.randn(1, n, hkv, d)
    out = attend(0, q, k, v, meta, cache)[0]
    start = 0
    for q_len, ctx in zip(query_lens, contexts):
        expected = naive(q[0, start:start + q_len], cache.k[0], cache.v[0], ctx, q_len)
        assert torch.allclose(out[start:start + q_len], expected, atol=1e-5)
        start += q_len
    # The new tokens' K/V were written at the last q_len slots of each context.
    for q_len, ctx, s in zip(query_lens, contexts, torch.tensor(query_lens).cumsum(0).tolist()):
        assert torch.equal(cache.k[0, ctx[-q_len:]], k[0, s - q_len:s])
