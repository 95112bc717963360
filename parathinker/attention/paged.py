"""Attention over the paged KV pool, reading K/V in place (no copy of any context).

The pool holds, per layer, `[Hkv, num_slots, D]` (head-major): a run of consecutive slots is one
contiguous `[n, D]` matrix per KV head, so attention can read it as a view. A sequence's context
(the prompt's slots, a path's or every path's, its own) is a short list of such runs, kept
incrementally by the engine's sequences, so the metadata of one step is O(runs), not O(tokens):

    slot_mapping [N]     slot of each new token, in flat token order (written before attending)
    qo_indptr   [S+1]    sequence s owns flat tokens qo_indptr[s] : qo_indptr[s+1] (its queries)
    kv_indptr   [S+1]    sequence s's context is runs kv_indptr[s] : kv_indptr[s+1], in order
    run_start   [R]      first slot of each run
    run_len     [R]      number of slots in each run

A sequence's new tokens are the last q_len slots of its context; its queries are causal among
them and see the whole rest of the context. Backends, one `if` each:

- "runs" (CPU default): per sequence, the scores against each run are one matmul over a view of
  the pool; one softmax over the concatenated scores; the output is the sum over runs.
- "flex" (GPU; also compiles on CPU): FlexAttention over the whole pool with a block mask built
  from the same runs (`parathinker.attention.flex_paged`).
- "gathered": gathers each context into a new tensor and runs masked SDPA: the slow,
  obviously-correct twin the others are tested against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

BACKENDS = ("runs", "flex", "gathered")
# The runs backend copies a context out of the pool when it has more than GATHER_MIN_RUNS runs
# of fewer than GATHER_MAX_MEAN_RUN slots on average (a fragmented pool), else reads in place.
GATHER_MIN_RUNS = 4
GATHER_MAX_MEAN_RUN = 32
# Sequences decoding one token over at most this many slots are batched into one call (their
# K/V copied: cheap at this size, while a Python loop of small matmuls per sequence is not).
BATCH_MAX_CONTEXT = 512
# Score buffers of the runs backend stay under this many bytes (queries are chunked to fit).
MAX_SCORE_BYTES = 64 << 20


@dataclass
class PagedKVCache:
    """The KV pool: one slot per cached token, per layer, head-major."""

    k: torch.Tensor  # [num_layers, Hkv, num_slots, D]
    v: torch.Tensor  # [num_layers, Hkv, num_slots, D]

    @classmethod
    def allocate(cls, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str,
                 zeroed: bool = False) -> PagedKVCache:
        """zeroed=False (the runs and gathered backends): torch.empty, so that on CPU the pages
        are only backed by memory once written (no 4 GiB of zeros at start); those backends read
        only slots written before. zeroed=True (flex): its kernels read whole 16-slot pages and
        mask the slots not in a context, but a masked slot's V still enters P @ V with weight 0,
        and 0 * NaN (never-written memory) is NaN: every slot must hold a finite value."""
        shape = (num_layers, num_kv_heads, num_slots, head_dim)
        alloc = torch.zeros if zeroed else torch.empty
        return cls(alloc(shape, dtype=dtype, device=device), alloc(shape, dtype=dtype, device=device))

    @property
    def num_slots(self) -> int:
        return self.k.shape[2]


@dataclass
class PagedAttention:
    """Metadata of one step (see the module docstring). Host lists drive the runs and gathered
    backends; `state` holds what a backend builds once per step for every layer (the flex block
    mask; the runs backend's ShortBatch)."""

    slot_mapping: torch.Tensor  # [N] int64, on the model's device
    qo_indptr: list[int]  # [S+1]
    kv_indptr: list[int]  # [S+1]
    run_start: list[int]  # [R]
    run_len: list[int]  # [R]
    backend: str = "runs"
    state: Any = field(default=None, repr=False)

    @classmethod
    def build(cls, query_lens: Sequence[int], contexts: Sequence[Sequence[tuple[int, int]]],
              device: torch.device | str, backend: str = "runs") -> PagedAttention:
        """contexts[s]: runs (start slot, length) of sequence s's context, whose last
        query_lens[s] slots are its new tokens."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; use one of {BACKENDS}")
        qo, kv, starts, lens, slots = [0], [0], [], [], []
        for s, (q, runs) in enumerate(zip(query_lens, contexts)):
            if not 1 <= q <= sum(n for _, n in runs):
                raise ValueError(f"sequence {s}: {q} new tokens for a context of runs {runs}")
            slots += _tail_slots(runs, q)
            for a, n in runs:
                starts.append(a)
                lens.append(n)
            qo.append(qo[-1] + q)
            kv.append(len(starts))
        slot_mapping = torch.cat(slots).to(device)
        meta = cls(slot_mapping, qo, kv, starts, lens, backend)
        if backend == "flex":
            from parathinker.attention.flex_paged import build_flex_state

            meta.state = build_flex_state(meta, device)
        elif backend == "runs":
            meta.state = _plan_short(meta, device)
        return meta

    @property
    def num_seqs(self) -> int:
        return len(self.qo_indptr) - 1

    def runs(self, s: int) -> list[tuple[int, int]]:
        a, b = self.kv_indptr[s], self.kv_indptr[s + 1]
        return list(zip(self.run_start[a:b], self.run_len[a:b]))


def _tail_slots(runs: Sequence[tuple[int, int]], q: int) -> list[torch.Tensor]:
    """The last q slots of a context, as aranges in order."""
    out = []
    for a, n in reversed(runs):
        take = min(n, q)
        out.append(torch.arange(a + n - take, a + n))
        q -= take
        if not q:
            break
    return out[::-1]


def write_kv(kv_cache: PagedKVCache, layer: int, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v: [N, Hkv, D] -> the pool's slots."""
    kv_cache.k[layer][:, slot_mapping] = k.transpose(0, 1)
    kv_cache.v[layer][:, slot_mapping] = v.transpose(0, 1)


def paged_attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 meta: PagedAttention, kv_cache: PagedKVCache) -> torch.Tensor:
    """q: [1, N, Hq, D], k/v: [1, N, Hkv, D] (flat tokens) -> [1, N, Hq, D]."""
    write_kv(kv_cache, layer, k[0], v[0], meta.slot_mapping)
    k_pool, v_pool = kv_cache.k[layer], kv_cache.v[layer]
    if meta.backend == "flex":
        from parathinker.attention.flex_paged import flex_paged_attend

        return flex_paged_attend(q, k_pool, v_pool, meta)
    fn = _attend_runs if meta.backend == "runs" else _attend_gathered
    out = torch.empty_like(q[0])
    short: ShortBatch | None = meta.state if meta.backend == "runs" else None
    if short is not None:  # short decoding contexts in one batched call (Python-bound alone)
        out[short.rows] = _attend_short(q[0, short.rows], k_pool, v_pool, short)
    for s in short.rest if short is not None else range(meta.num_seqs):
        a, b = meta.qo_indptr[s], meta.qo_indptr[s + 1]
        out[a:b] = fn(q[0, a:b], k_pool, v_pool, meta.runs(s))
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


def _attend_gathered(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                     runs: list[tuple[int, int]]) -> torch.Tensor:
    """The slow twin: copy the context's K/V out of the pool, masked SDPA over them."""
    t, _, _ = q.shape
    slots = torch.cat([torch.arange(a, a + n) for a, n in runs]).to(k_pool.device)
    k, v = k_pool[:, slots][None], v_pool[:, slots][None]  # [1, Hkv, C, D]
    c = slots.numel()
    visible = torch.arange(c, device=q.device)[None, :] <= torch.arange(c - t, c, device=q.device)[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k, v, attn_mask=visible,
                                         enable_gqa=True)  # [1, Hq, T, D]
    return out[0].transpose(0, 1)


def runs_of(slots: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive slots as (start, length) runs: [3, 4, 5, 9] -> [(3, 3), (9, 1)]."""
    runs: list[tuple[int, int]] = []
    for s in slots:
        if runs and runs[-1][0] + runs[-1][1] == s:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((s, 1))
    return runs
