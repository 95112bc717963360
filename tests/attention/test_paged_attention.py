"""Paged attention backends (runs, gathered) against per-sequence naive attention."""

import math
import random

import pytest
import torch

from parathinker.attention.paged import PagedAttention, PagedKVCache, paged_attend, runs_of


def naive(q, k_all, v_all, ctx, q_len):
    """q: [q_len, Hq, D]; the pool's K/V: [Hkv, S, D]; causal among the last q_len of ctx."""
    hq, hkv = q.shape[1], k_all.shape[0]
    k = k_all[:, ctx].transpose(0, 1).repeat_interleave(hq // hkv, dim=1).double()  # [C, Hq, D]
    v = v_all[:, ctx].transpose(0, 1).repeat_interleave(hq // hkv, dim=1).double()
    out = []
    for i in range(q_len):
        visible = len(ctx) - q_len + i + 1
        scores = torch.einsum("hd,chd->hc", q[i].double(), k[:visible]) / math.sqrt(q.shape[-1])
        out.append(torch.einsum("hc,chd->hd", scores.softmax(-1), v[:visible]))
    return torch.stack(out).float()


def test_runs_of():
    assert runs_of([3, 4, 5, 9, 10, 2]) == [(3, 3), (9, 2), (2, 1)]
    assert runs_of([]) == []


@pytest.mark.parametrize("backend,gather", [("runs", "never"), ("runs", "always"),
                                            ("runs", "default"), ("gathered", "default")])
def test_paged_attention_matches_naive(backend, gather, monkeypatch):
    import parathinker.attention.paged as paged

    monkeypatch.setattr(paged, "MAX_SCORE_BYTES", 4096)  # force query chunking too
    if gather != "default":  # runs read in place, or every context copied out first
        monkeypatch.setattr(paged, "GATHER_MIN_RUNS", 10**9 if gather == "never" else 0)
        monkeypatch.setattr(paged, "GATHER_MAX_MEAN_RUN", 10**9)
        monkeypatch.setattr(paged, "BATCH_MAX_CONTEXT", 0 if gather == "never" else 10**9)
    rng = random.Random(0)
    torch.manual_seed(0)
    hq, hkv, d, num_slots = 6, 2, 8, 600
    cache = PagedKVCache.allocate(1, num_slots, hkv, d, torch.float32, "cpu")
    cache.k.normal_()
    cache.v.normal_()
    shared = list(range(0, 20))  # a "prompt" read by several sequences
    free = list(range(20, num_slots))
    rng.shuffle(free)  # own slots scattered: many runs, tails across runs
    free = iter(sorted(free[:300]) + free[300:])
    query_lens, contexts = [], []
    for ctx_len, q_len in [(3, 3), (25, 1), (26, 1), (90, 7), (5, 2), (200, 1), (60, 40)]:
        own = [next(free) for _ in range(max(ctx_len - len(shared), q_len))]
        ctx = shared + own if rng.random() < 0.5 else own
        query_lens.append(q_len)
        contexts.append(ctx)
    meta = PagedAttention.build(query_lens, [runs_of(c) for c in contexts], "cpu", backend)
    n = sum(query_lens)
    q, k, v = torch.randn(1, n, hq, d), torch.randn(1, n, hkv, d), torch.randn(1, n, hkv, d)
    out = paged_attend(0, q, k, v, meta, cache)[0]
    start = 0
    for q_len, ctx in zip(query_lens, contexts):
        # the new tokens' K/V were written at the last q_len slots of the context
        assert torch.equal(cache.k[0][:, ctx[-q_len:]], k[0, start:start + q_len].transpose(0, 1))
        expected = naive(q[0, start:start + q_len], cache.k[0], cache.v[0], ctx, q_len)
        assert torch.allclose(out[start:start + q_len], expected, atol=1e-5)
        start += q_len
