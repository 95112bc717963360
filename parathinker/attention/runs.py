"""The "runs" paged backend (the CPU default): reads each context's K/V in place, as views of the
pool (`attention.pool`), with a flash kernel: no score or mask tensor of a prefill's queries x
context is ever built, so a prefill's memory grows linearly with its length.

Per sequence, its queries attend to two kinds of piece, each one flash call returning its output
and log-sum-exp (`_flash`), merged exactly by log-sum-exp (`_merge`):

- the prefix (the context before the new tokens), every query sees all of it: one call per run
  of the pool, read as a view, the G query heads of a KV head folded into its rows; a context
  in many short runs (a fragmented pool) is copied out first (only its own slots, `_gather_runs`);
- the new tokens themselves, causal among them: one call over the step's own K/V (a fresh
  prompt's prefill is this piece alone).

A decode token (one query) sees its whole context unmasked, so it is all prefix; in float32,
unless its context is fragmented or short (below), the step's decode tokens are attended
together instead, with no flash call and no merge (`attention.long_decode`).

Sequences that decode one token over a short context are batched into one SDPA call
(`ShortBatch`, planned once per step; their slots copied with one `index_select`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from parathinker.attention.long_decode import LongDecodes
from parathinker.attention.pool import PagedAttention, PagedKVCache, write_kv

# The runs backend copies a context out of the pool when it has more than GATHER_MIN_RUNS runs
# of fewer than GATHER_MAX_MEAN_RUN slots on average (a fragmented pool), else reads in place.
GATHER_MIN_RUNS = 4
GATHER_MAX_MEAN_RUN = 32
# Sequences decoding one token over at most this many slots are batched into one call (their
# K/V copied: cheap at this size, while a Python loop of small calls per sequence is not).
BATCH_MAX_CONTEXT = 512


class RunsBackend:
    name = "runs"
    zeroed_pool = False  # reads only slots written before
    wants_one_run = True  # a view and two matmuls per run and layer (attention.long_decode)

    def build_metadata(self, query_lens: Sequence[int],
                       contexts: Sequence[Sequence[tuple[int, int]]],
                       device: torch.device | str) -> PagedAttention:
        meta = PagedAttention.of_runs(query_lens, contexts, device, self)
        meta.state = _plan(meta, device)
        return meta

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_cache: PagedKVCache, meta: PagedAttention) -> torch.Tensor:
        write_kv(kv_cache, layer, k[0], v[0], meta.slot_mapping)
        k_pool, v_pool = kv_cache.k[layer], kv_cache.v[layer]
        plan: _Plan = meta.state
        short, long, rest = plan.short, plan.long, plan.rest
        if long is not None and q.dtype != torch.float32:  # low precision: the flash kernel
            long, rest = None, sorted(rest + plan.long_seqs)
        if short is not None and short.in_order and long is None and not rest:  # pure decode steps
            return _attend_short(q[0], k_pool, v_pool, short)[None]
        if long is not None and long.in_order and short is None and not rest:
            return long.attend(layer, q[0], kv_cache.k, kv_cache.v)[None]
        out = torch.empty_like(q[0])
        if short is not None:  # short decoding contexts in one batched call (Python-bound alone)
            out[short.rows] = _attend_short(q[0, short.rows], k_pool, v_pool, short)
        if long is not None:
            out[long.rows_t] = long.attend(layer, q[0], kv_cache.k, kv_cache.v)
        for s in rest:
            a, b = meta.qo_indptr[s], meta.qo_indptr[s + 1]
            out[a:b] = _attend_seq(q[0, a:b], k[0, a:b], v[0, a:b], k_pool, v_pool, meta.runs(s))
        return out[None]


@dataclass
class _Plan:
    """How the runs backend attends in one step (built once, read by every layer)."""

    short: ShortBatch | None  # decode tokens over short contexts, one batched call
    long: LongDecodes | None  # other decode tokens over contexts read in place (float32)
    long_seqs: list[int]  # the sequences of `long`
    rest: list[int]  # the others, one by one (`_attend_seq`)


def _plan(meta: PagedAttention, device: torch.device | str) -> _Plan:
    short = _plan_short(meta, device)
    batched = set() if short is None else set(short.seqs)
    long_seqs, rest = [], []
    for s in range(meta.num_seqs):
        if s in batched:
            continue
        decodes = meta.qo_indptr[s + 1] - meta.qo_indptr[s] == 1
        (long_seqs if decodes and not _fragmented(meta.runs(s)) else rest).append(s)
    long = None
    if long_seqs:
        rows = [meta.qo_indptr[s] for s in long_seqs]
        long = LongDecodes(rows, [meta.runs(s) for s in long_seqs],
                           torch.tensor(rows, device=device), rows == list(range(len(rows))))
    return _Plan(short, long, long_seqs, rest)


def _fragmented(runs: list[tuple[int, int]]) -> bool:
    """A context in many short runs: copied out first (about one more read of it), not a call
    per run."""
    return len(runs) > GATHER_MIN_RUNS and sum(n for _, n in runs) < GATHER_MAX_MEAN_RUN * len(runs)


@dataclass
class ShortBatch:
    """The runs backend's batch of one step (built once, read by every layer): sequences that
    decode one token over at most BATCH_MAX_CONTEXT slots."""

    rows: torch.Tensor  # [B] their flat token
    slots: torch.Tensor  # [B, Cmax] their contexts' slots, padded with slot 0
    padding: torch.Tensor  # [B, 1, 1, Cmax] bool: True on the padding
    seqs: list[int]  # their sequences
    in_order: bool  # rows are 0..B-1
    mask: torch.Tensor | None = None  # padding as an additive mask in q's dtype, made by layer 0

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """Once per step: SDPA would convert a bool mask again in every layer."""
        if self.mask is None or self.mask.dtype != dtype:
            zeros = torch.zeros(self.padding.shape, dtype=dtype, device=self.padding.device)
            self.mask = zeros.masked_fill(self.padding, float("-inf"))
        return self.mask


def _plan_short(meta: PagedAttention, device: torch.device | str) -> ShortBatch | None:
    lens = [sum(meta.run_len[meta.kv_indptr[s]: meta.kv_indptr[s + 1]]) for s in range(meta.num_seqs)]
    short = [s for s in range(meta.num_seqs)
             if meta.qo_indptr[s + 1] - meta.qo_indptr[s] == 1 and lens[s] <= BATCH_MAX_CONTEXT]
    if len(short) < 2:
        return None
    c_max = max(lens[s] for s in short)
    table = []  # at most BATCH_MAX_CONTEXT ints a row: one host tensor, not ops per run
    for s in short:
        row = [slot for a, n in meta.runs(s) for slot in range(a, a + n)]
        table.append(row + [0] * (c_max - len(row)))
    slots = torch.tensor(table, dtype=torch.long)
    padding = torch.arange(c_max)[None, :] >= torch.tensor([lens[s] for s in short])[:, None]
    rows = [meta.qo_indptr[s] for s in short]
    return ShortBatch(torch.tensor(rows, device=device), slots.to(device),
                      padding[:, None, None].to(device), short, rows == list(range(len(rows))))


def _attend_short(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                  short: ShortBatch) -> torch.Tensor:
    """q [B, Hq, D], one new token per sequence of the batch; their K/V copied into
    [B, Hkv, Cmax, D] (padding masked) and one SDPA. index_select on the slot axis, not the
    advanced index k_pool[:, slots]: 0.1 ms against 30 ms for 8 x 400 slots (BENCHMARKS.md)."""
    b, c_max = short.slots.shape
    flat = short.slots.view(-1)
    k = k_pool.index_select(1, flat).view(-1, b, c_max, k_pool.shape[-1]).transpose(0, 1)
    v = v_pool.index_select(1, flat).view(-1, b, c_max, v_pool.shape[-1]).transpose(0, 1)
    out = F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True,
                                         attn_mask=short.additive_mask(q.dtype))  # [B, Hq, 1, D]
    return out[:, :, 0]


def _gather_runs(pool: torch.Tensor, runs: list[tuple[int, int]]) -> torch.Tensor:
    """The context's slots of pool [Hkv, S, D], copied in order: [Hkv, C, D]."""
    starts = torch.tensor([a for a, _ in runs])
    lens = torch.tensor([n for _, n in runs])
    offsets = torch.cumsum(lens, 0) - lens
    slots = torch.arange(int(lens.sum())) + torch.repeat_interleave(starts - offsets, lens)
    return pool.index_select(1, slots.to(pool.device))


def _head_runs(runs: list[tuple[int, int]], drop: int) -> list[tuple[int, int]]:
    """The runs of a context without its last `drop` slots."""
    out, keep = [], sum(n for _, n in runs) - drop
    for a, n in runs:
        if keep <= 0:
            break
        out.append((a, min(n, keep)))
        keep -= n
    return out


def _attend_seq(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_pool: torch.Tensor,
                v_pool: torch.Tensor, runs: list[tuple[int, int]]) -> torch.Tensor:
    """One sequence: q [T, Hq, D], its own new K/V [T, Hkv, D] (also the last T slots of its
    context); the prefix read from the pool [Hkv, S, D] in place (see the module docstring).
    -> [T, Hq, D]."""
    t, hq, _ = q.shape
    hkv = k_pool.shape[0]
    prefix = runs if t == 1 else _head_runs(runs, t)
    if _fragmented(prefix):
        k_pool, v_pool = _gather_runs(k_pool, prefix), _gather_runs(v_pool, prefix)
        prefix = [(0, k_pool.shape[1])]
    parts = []
    if prefix:  # unmasked: the G query heads of a KV head folded into its rows, one K/V read
        qf = _fold(q, hkv)[None]  # [1, Hkv, T*G, D]
        o, lse = _merge([_flash(qf, k_pool[None, :, a: a + n], v_pool[None, :, a: a + n], False)
                         for a, n in prefix])
        parts.append((_unfold(o[0], t), lse[0].view(hkv, t, -1).permute(1, 0, 2).reshape(t, hq)))
    if t > 1:  # causal among the new tokens: the step's own K/V, no pool read
        o, lse = _flash(q.transpose(0, 1)[None], k_new.transpose(0, 1)[None],
                        v_new.transpose(0, 1)[None], True)
        parts.append((o[0].transpose(0, 1), lse[0].transpose(0, 1)))
    return _merge(parts)[0]


def _fold(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[T, Hq, D] -> [Hkv, T*G, D]: the G query heads of a KV head share its K/V reads."""
    t, hq, d = q.shape
    g = hq // num_kv_heads
    return q.view(t, num_kv_heads, g, d).permute(1, 0, 2, 3).reshape(num_kv_heads, t * g, d)


def _unfold(o: torch.Tensor, t: int) -> torch.Tensor:
    """[Hkv, T*G, D] -> [T, Hq, D]."""
    hkv, tg, d = o.shape
    return o.view(hkv, t, tg // t, d).permute(1, 0, 2, 3).reshape(t, -1, d)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [1, Hq, T, D] over k, v [1, Hkv, n, D] (GQA; causal: T == n) and its
    log-sum-exp [1, Hq, T] (float32): on CPU the flash kernel (tiles, online softmax). That
    kernel reads the last dim as contiguous whatever the strides (torch 2.13: a wrong result,
    not an error; public SDPA copies first), so an input strided there is copied first (none
    is today; the guard costs a stride check)."""
    if q.device.type == "cpu":
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=causal)
    return _plain(q, k, v, causal)


def _plain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`_flash` off the CPU, from whole score matrices (the runs backend is the CPU default;
    flex serves CUDA)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    lse = scores.logsumexp(-1)
    return (scores - lse[..., None]).exp().to(v.dtype) @ v, lse


def _merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of disjoint key sets from each set's (output [..., D],
    log-sum-exp [...]): lse = log sum_i exp(lse_i), out = sum_i exp(lse_i - lse) out_i."""
    if len(parts) == 1:
        return parts[0]
    lse = torch.logsumexp(torch.stack([l for _, l in parts]), 0)
    out = sum(o.float() * (l - lse).exp()[..., None] for o, l in parts)
    return out.to(parts[0][0].dtype), lse
