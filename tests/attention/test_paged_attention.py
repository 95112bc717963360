"""Paged attention backends (runs, gathered) against per-sequence naive attention."""

import math
import random

import pytest
import torch

from parathinker.attention.paged import BACKENDS, backend_for
from parathinker.attention.pool import PagedKVCache, runs_of


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


@pytest.mark.parametrize("backend,gather", [("runs", "never"), ("runs", "always"), ("runs", "mixed"),
                                            ("runs", "default"), ("gathered", "default")])
def test_paged_attention_matches_naive(backend, gather, monkeypatch):
    import parathinker.attention.runs as runs

    if gather != "default":  # runs read in place, or every context copied out first
        monkeypatch.setattr(runs, "GATHER_MIN_RUNS", 10**9 if gather != "always" else 0)
        monkeypatch.setattr(runs, "GATHER_MAX_MEAN_RUN", 10**9)
        # mixed: the two short decodes batched, the long one (200 slots) on its own path
        batch = {"never": 0, "always": 10**9, "mixed": 30}[gather]
        monkeypatch.setattr(runs, "BATCH_MAX_CONTEXT", batch)
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
    meta = backend_for(backend, "cpu").build_metadata(query_lens, [runs_of(c) for c in contexts], "cpu")
    n = sum(query_lens)
    q, k, v = torch.randn(1, n, hq, d), torch.randn(1, n, hkv, d), torch.randn(1, n, hkv, d)
    out = meta.attend(0, q, k, v, cache)[0]  # as the model calls it
    start = 0
    for q_len, ctx in zip(query_lens, contexts):
        # the new tokens' K/V were written at the last q_len slots of the context
        assert torch.equal(cache.k[0][:, ctx[-q_len:]], k[0, start:start + q_len].transpose(0, 1))
        expected = naive(q[0, start:start + q_len], cache.k[0], cache.v[0], ctx, q_len)
        assert torch.allclose(out[start:start + q_len], expected, atol=1e-5)
        start += q_len


def test_backend_for_picks_each_backend_once_by_name():
    """The user's names (LLM(attention=...), --attention) each give their backend; "auto" gives
    runs on CPU and flex on CUDA (BENCHMARKS.md); a typo is an error naming the choices."""
    assert [backend_for(name, "cpu").name for name in BACKENDS] == ["runs", "flex", "gathered"]
    assert backend_for("auto", "cpu").name == "runs"
    assert backend_for("auto", torch.device("cuda")).name == "flex"  # names a device; none needed
    # only flex reads whole 16-slot pages (masked): its pool must start finite
    assert [backend_for(name, "cpu").zeroed_pool for name in BACKENDS] == [False, True, False]
    with pytest.raises(ValueError, match=r"unknown attention backend 'rusn'; use auto or one of"):
        backend_for("rusn", "cpu")


def test_metadata_carries_the_backend_that_built_it():
    """One step's metadata is built once by the chosen backend and attends with it in every
    layer: the gathered twin's metadata attends as the gathered twin, not as the runs default."""
    cache = PagedKVCache.allocate(1, 64, 1, 4, torch.float32, "cpu")
    meta = backend_for("gathered", "cpu").build_metadata([1], [[(0, 3)]], "cpu")
    assert meta.backend.name == "gathered" and meta.state is None
    assert meta.slot_mapping.tolist() == [2] and meta.runs(0) == [(0, 3)]
    with pytest.raises(ValueError, match="2 new tokens for a context of runs"):
        backend_for("runs", "cpu").build_metadata([2], [[(5, 1)]], "cpu")
    q, k, v = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4)
    cache.k[0, :, :2].normal_()
    cache.v[0, :, :2].normal_()
    out = meta.attend(0, q, k, v, cache)[0]
    expected = naive(q[0], cache.k[0], cache.v[0], [0, 1, 2], 1)
    assert torch.allclose(out, expected, atol=1e-5)
