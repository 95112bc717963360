"""The "runs" paged backend (the CPU default): reads each context's K/V in place, as views of the
pool (`attention.pool`).

Per sequence, the scores against each run are one matmul over a view of the pool; one softmax
over the concatenated scores; the output is the sum over runs. Two exceptions, both for speed
only: a context in many short runs (a fragmented pool) is copied out first, and sequences that
decode one token over a short context are batched into one SDPA call (`ShortBatch`, planned once
per step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from parathinker.attention.pool import PagedAttention, PagedKVCache, attend_each, write_kv

# The runs backend copies a context out of the pool when it has more than GATHER_MIN_RUNS runs
# of fewer than GATHER_MAX_MEAN_RUN slots on average (a fragmented pool), else reads in place.
GATHER_MIN_RUNS = 4
GATHER_MAX_MEAN_RUN = 32
# Sequences decoding one token over at most this many slots are batched into one call (their
# K/V copied: cheap at this size, while a Python loop of small matmuls per sequence is not).
BATCH_MAX_CONTEXT = 512
# Score buffers of the runs backend stay under this many bytes (queries are chunked to fit).
MAX_SCORE_BYTES = 64 << 20


class RunsBackend:
    name = "runs"
    zeroed_pool = False  # reads only slots written before

    def build_metadata(self, query_lens: Sequence[int],
                       contexts: Sequence[Sequence[tuple[int, int]]],
                       device: torch.device | str) -> PagedAttention:
        meta = PagedAttention.of_runs(query_lens, contexts, device, self)
        meta.state = _plan_short(meta, device)
        return meta

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_cache: PagedKVCache, meta: PagedAttention) -> torch.Tensor:
        write_kv(kv_cache, layer, k[0], v[0], meta.slot_mapping)
        k_pool, v_pool = kv_cache.k[layer], kv_cache.v[layer]
        out = torch.empty_like(q[0])
        short: ShortBatch | None = meta.state
        rest: Sequence[int] = range(meta.num_seqs)
        if short is not None:  # short decoding contexts in one batched call (Python-bound alone)
            out[short.rows] = _attend_short(q[0, short.rows], k_pool, v_pool, short)
            rest = short.rest
        attend_each(q[0], out, meta, rest, lambda qs, runs: _attend_runs(qs, k_pool, v_pool, runs))
        return out[None]


@dataclass
class ShortBatch:
    """The runs backend's batch of one step (built once, read by every layer): sequences that
    decode one token over at most BATCH_MAX_CONTEXT slots."""

    rows: torch.Tensor  # [B] their flat token
    slots: torch.Tensor  # [B, Cmax] their contexts' slots, padded with slot 0
    visible: torch.Tensor  # [B, 1, 1, Cmax] bool: False on the padding
    rest: list[int]  # the other sequences


def _plan_short(meta: PagedAttention, device: torch.device | str) -> ShortBatch | None:
    lens = [sum(meta.run_len[meta.kv_indptr[s]: meta.kv_indptr[s + 1]]) for s in range(meta.num_seqs)]
    short = [s for s in range(meta.num_seqs)
             if meta.qo_indptr[s + 1] - meta.qo_indptr[s] == 1 and lens[s] <= BATCH_MAX_CONTEXT]
    if len(short) < 2:
        return None
    c_max = max(lens[s] for s in short)
    slots = torch.zeros(len(short), c_max, dtype=torch.long)
    for i, s in enumerate(short):  # O(runs) slices, no per-slot Python
        off = 0
        for a, n in meta.runs(s):
            slots[i, off: off + n] = torch.arange(a, a + n)
            off += n
    visible = torch.arange(c_max)[None, :] < torch.tensor([lens[s] for s in short])[:, None]
    is_short = set(short)
    return ShortBatch(torch.tensor([meta.qo_indptr[s] for s in short], device=device),
                      slots.to(device), visible[:, None, None].to(device),
                      [s for s in range(meta.num_seqs) if s not in is_short])


def _attend_short(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                  short: ShortBatch) -> torch.Tensor:
    """q [B, Hq, D], one new token per sequence of the batch; their K/V copied into
    [B, Hkv, Cmax, D] (padding masked) and one SDPA."""
    k = k_pool[:, short.slots].transpose(0, 1)  # [B, Hkv, Cmax, D]
    v = v_pool[:, short.slots].transpose(0, 1)
    out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=short.visible,
                                         enable_gqa=True)  # [B, Hq, 1, D]
    return out[:, :, 0]


def _fold(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[T, Hq, D] -> [Hkv, T*G, D]: the G query heads of a KV head share its K/V reads."""
    t, hq, d = q.shape
    g = hq // num_kv_heads
    return q.view(t, num_kv_heads, g, d).permute(1, 0, 2, 3).reshape(num_kv_heads, t * g, d)


def _unfold(o: torch.Tensor, t: int) -> torch.Tensor:
    """[Hkv, T*G, D] -> [T, Hq, D]."""
    hkv, tg, d = o.shape
    return o.view(hkv, t, tg // t, d).permute(1, 0, 2, 3).reshape(t, -1, d)


def _causal_tail(t: int, c: int, g: int, device: torch.device) -> torch.Tensor:
    """[T*G, C] bool: query row (t, g) sees context index <= C - T + t."""
    last = torch.arange(c - t, c, device=device).repeat_interleave(g)
    return torch.arange(c, device=device)[None, :] <= last[:, None]


def _gather_runs(pool: torch.Tensor, runs: list[tuple[int, int]]) -> torch.Tensor:
    """The context's slots of pool [Hkv, S, D], copied in order: [Hkv, C, D]."""
    starts = torch.tensor([a for a, _ in runs])
    lens = torch.tensor([n for _, n in runs])
    offsets = torch.cumsum(lens, 0) - lens
    slots = torch.arange(int(lens.sum())) + torch.repeat_interleave(starts - offsets, lens)
    return pool.index_select(1, slots.to(pool.device))


def _attend_runs(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                 runs: list[tuple[int, int]]) -> torch.Tensor:
    """One sequence: q [T, Hq, D]; K/V read as views of each run of the pool [Hkv, S, D]. A
    context in many short runs (a fragmented pool) is copied into one first: a copy costs about
    one more read of it, while a matmul per 16-slot run costs several (BENCHMARKS.md)."""
    if len(runs) > GATHER_MIN_RUNS and sum(n for _, n in runs) < GATHER_MAX_MEAN_RUN * len(runs):
        k, v = _gather_runs(k_pool, runs), _gather_runs(v_pool, runs)
        return _attend_in_place(q, k, v, [(0, k.shape[1])])
    return _attend_in_place(q, k_pool, v_pool, runs)


def _attend_in_place(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                     runs: list[tuple[int, int]]) -> torch.Tensor:
    t, _, d = q.shape
    hkv = k_pool.shape[0]
    g = q.shape[1] // hkv
    c = sum(n for _, n in runs)
    qf = _fold(q, hkv) * d ** -0.5  # [Hkv, T*G, D]
    chunk = max(1, MAX_SCORE_BYTES // (4 * hkv * g * c))  # query tokens per score buffer
    outs = []
    for t0 in range(0, t, chunk):
        t1 = min(t, t0 + chunk)
        rows = qf[:, t0 * g: t1 * g]
        # torch.bmm, not matmul: matmul copies a strided slice of the pool first
        scores = torch.cat([torch.bmm(rows, k_pool[:, a: a + n].transpose(1, 2))
                            for a, n in runs], -1).float()  # [Hkv, rows, C]
        if t > 1:  # queries see the context up to themselves
            visible = _causal_tail(t, c, g, q.device)[t0 * g: t1 * g]
            scores = scores.masked_fill(~visible, float("-inf"))
        p = scores.softmax(-1).to(q.dtype)
        o, off = None, 0
        for a, n in runs:
            part = torch.bmm(p[..., off: off + n], v_pool[:, a: a + n])
            o = part if o is None else o + part
            off += n
        outs.append(o)
    return _unfold(torch.cat(outs, 1), t)
