"""The runs backend's decode tokens over long contexts (float32), planned once per step.

Each such token (one query of sequence s) sees its whole context unmasked, its own K/V already
written to the pool: its scores over each run of the context (one bmm per run over a view of the
pool, the G query heads of a KV head as G rows) are joined into one row per query head, one
softmax per sequence, then P @ V accumulated run by run. No flash call and no log-sum-exp merge,
and no copy of any K/V (BENCHMARKS.md, "Decode attention over long contexts"). Each run's scores
go to a contiguous buffer first, then one `cat` per sequence: torch splits a bmm whose output is
a column slice into one matmul per KV head, which on two threads cost ~4 % of a step.

The buffers (queries, scores, probabilities, outputs) and their views per run are made by the
first layer and reused by every layer of the step, so that a layer costs four dispatches per run
(two pool views, two matmuls) and a cat and a softmax per sequence, not a dozen per run (slices,
transposes, allocations, the merge's arithmetic) at a few microseconds each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LongDecodes:
    """One step's decode tokens over long contexts: token rows[i] over the pool runs runs[i]."""

    rows: list[int]  # flat token of each sequence
    runs: list[list[tuple[int, int]]]  # its context, own slot included
    rows_t: torch.Tensor  # rows, on the device
    in_order: bool  # rows are 0..B-1
    buf: _Buffers | None = field(default=None, repr=False)

    def attend(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> torch.Tensor:
        """q [N, Hq, D] (every flat token); k_pool, v_pool [Hkv, S, D] (one layer of the pool)
        -> [B, Hq, D], the attention of the tokens `rows`."""
        hkv, _, d = k_pool.shape
        if self.buf is None:
            self.buf = _Buffers(self.runs, q.shape[1] // hkv, k_pool)
        buf = self.buf
        mine = q[: len(self.rows)] if self.in_order else q.index_select(0, self.rows_t)
        torch.mul(mine.unflatten(1, (hkv, -1)), d ** -0.5, out=buf.q)
        (hs, ss, ds), base = k_pool.stride(), k_pool.storage_offset()
        for qs, runs, scores, probs, run_scores, p_views, out in zip(
                buf.q_views, self.runs, buf.scores, buf.probs, buf.run_scores, buf.p_views,
                buf.out_views):
            for (a, n), s_run in zip(runs, run_scores):  # K^T of the run: [Hkv, D, n], a view
                torch.bmm(qs, k_pool.as_strided((hkv, d, n), (hs, ds, ss), base + a * ss), out=s_run)
            if len(runs) > 1:
                torch.cat(run_scores, 2, out=scores)
            torch.softmax(scores, -1, out=probs)
            for i, ((a, n), p_view) in enumerate(zip(runs, p_views)):
                v_run = v_pool.as_strided((hkv, n, d), (hs, ss, ds), base + a * ss)
                if i == 0:
                    torch.bmm(p_view, v_run, out=out)
                else:
                    out.baddbmm_(p_view, v_run)
        return buf.out.view(len(self.rows), -1, d).clone()  # the buffer is the next layer's


class _Buffers:
    """What every layer of one step reuses: per sequence, its queries [Hkv, G, D], each run's
    scores [Hkv, G, n] (contiguous), its scores and probabilities [Hkv, G, C] with the
    probabilities' column range per run, and its output [Hkv, G, D]: 3 floats per query head and
    context slot, against 2 x layers x Hkv x D of K/V (0.25 % for the 1.5B shape)."""

    def __init__(self, runs: list[list[tuple[int, int]]], g: int, pool: torch.Tensor) -> None:
        hkv, _, d = pool.shape
        b = len(runs)
        self.q = torch.empty(b, hkv, g, d, dtype=pool.dtype, device=pool.device)
        self.out = torch.empty_like(self.q)
        self.q_views, self.out_views = list(self.q.unbind(0)), list(self.out.unbind(0))
        self.scores, self.probs, self.run_scores, self.p_views = [], [], [], []
        for seq_runs in runs:
            scores = torch.empty(hkv, g, sum(n for _, n in seq_runs), dtype=pool.dtype,
                                 device=pool.device)
            probs = torch.empty_like(scores)
            self.scores.append(scores)
            self.probs.append(probs)
            starts = [0]
            for _, n in seq_runs[:-1]:
                starts.append(starts[-1] + n)
            self.run_scores.append([scores] if len(seq_runs) == 1 else
                                   [torch.empty(hkv, g, n, dtype=pool.dtype, device=pool.device)
                                    for _, n in seq_runs])
            self.p_views.append([probs[:, :, o: o + n] for o, (_, n) in zip(starts, seq_runs)])
