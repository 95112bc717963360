"""The runs backend's decode tokens over long contexts (float32), planned once per step.

Each such token (one query of sequence s) sees its whole context unmasked, its own K/V already
written to the pool: its scores over each run of the context (one bmm per run over a view of the
pool, the G query heads of a KV head as G rows) are joined into one row per query head, one
softmax per sequence, then P @ V accumulated run by run. No flash call and no log-sum-exp merge,
and no copy of any K/V (BENCHMARKS.md, "Decode attention over long contexts"). Each run's scores
go to a contiguous buffer first, then one `cat` per sequence: torch splits a bmm whose output is
a column slice into one matmul per KV head, which on two threads cost ~4 % of a step.

The buffers (queries, scores, probabilities, outputs) and their views per run, and each run's
K/V views in every layer of the pool, are made by the first layer and reused by every layer of
the step, so that a layer costs two dispatches per run (two matmuls) and a cat and a softmax per
sequence, not a dozen per run (slices, transposes, allocations, the merge's arithmetic) at a few
microseconds each.

On the CPU, where `attention.native` builds, the two matmuls are its kernels instead (one call
each per layer for every sequence; MKL's small-row matmul reads K at about half the read
bandwidth, BENCHMARKS.md "A decode kernel"): the matmuls stay as their twin (USE_NATIVE = False)
and serve every other case.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from parathinker.attention import native

USE_NATIVE = True  # the CPU kernels where they serve (tests set False for the matmul twin)
CHUNK = 1024  # context keys per work item of the kernels (cpu_decode.cpp)


@dataclass
class LongDecodes:
    """One step's decode tokens over long contexts: token rows[i] over the pool runs runs[i]."""

    rows: list[int]  # flat token of each sequence
    runs: list[list[tuple[int, int]]]  # its context, own slot included
    rows_t: torch.Tensor  # rows, on the device
    in_order: bool  # rows are 0..B-1
    buf: _Buffers | None = field(default=None, repr=False)

    def attend(self, layer: int, q: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor) -> torch.Tensor:
        """q [N, Hq, D] (every flat token); k_cache, v_cache [L, Hkv, S, D] (the pool of every
        layer) -> [B, Hq, D], the attention of the tokens `rows` in layer `layer`."""
        _, hkv, _, d = k_cache.shape
        if self.buf is None:
            self.buf = _Buffers(self.runs, q.shape[1] // hkv, k_cache, v_cache,
                                USE_NATIVE and native.serves(q, k_cache))
        buf = self.buf
        mine = q[: len(self.rows)] if self.in_order else q.index_select(0, self.rows_t)
        torch.mul(mine.unflatten(1, (hkv, -1)), d ** -0.5, out=buf.q)
        if buf.tables is not None:
            native.decode_scores(buf.q, k_cache[layer], buf.flat_scores, *buf.tables)
            for scores, probs in buf.softmax:
                torch.softmax(scores, -1, out=probs)
            native.decode_pv(buf.flat_probs, v_cache[layer], buf.partial, buf.out, *buf.tables)
        else:
            for qs, k_runs, v_runs, scores, probs, run_scores, p_views, out in zip(
                    buf.q_views, buf.k_runs, buf.v_runs, buf.scores, buf.probs, buf.run_scores,
                    buf.p_views, buf.out_views):
                for k_run, s_run in zip(k_runs, run_scores):
                    torch.bmm(qs, k_run[layer], out=s_run)
                if len(run_scores) > 1:
                    torch.cat(run_scores, 2, out=scores)
                torch.softmax(scores, -1, out=probs)
                torch.bmm(p_views[0], v_runs[0][layer], out=out)
                for p_view, v_run in zip(p_views[1:], v_runs[1:]):
                    out.baddbmm_(p_view, v_run[layer])
        return buf.out.view(len(self.rows), -1, d).clone()  # the buffer is the next layer's


class _Buffers:
    """What every layer of one step reuses: per sequence, its queries [Hkv, G, D], each run's
    scores [Hkv, G, n] (contiguous), its scores and probabilities [Hkv, G, C] with the
    probabilities' column range per run, and its output [Hkv, G, D]: 3 floats per query head and
    context slot, against 2 x layers x Hkv x D of K/V (0.25 % for the 1.5B shape). And each
    run's K^T [Hkv, D, n] and V [Hkv, n, D] in every layer, views of the pool: one `as_strided`
    and one `unbind` per run and step, not two views per run and layer. With the kernels
    (use_native), instead of the runs' buffers and views: their tables (`_tables`) and the
    partial P @ V of each chunk."""

    def __init__(self, runs: list[list[tuple[int, int]]], g: int, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, use_native: bool) -> None:
        _, hkv, _, d = k_cache.shape
        b, like = len(runs), dict(dtype=k_cache.dtype, device=k_cache.device)
        self.q = torch.empty(b, hkv, g, d, **like)
        self.out = torch.empty_like(self.q)
        lens = [sum(n for _, n in seq_runs) for seq_runs in runs]
        self.flat_scores = torch.empty(hkv * g * sum(lens), **like)  # [Hkv, G, C] per sequence
        self.flat_probs = torch.empty_like(self.flat_scores)
        offsets = [0]
        for c in lens:
            offsets.append(offsets[-1] + hkv * g * c)
        self.scores, self.probs = ([flat[o: o + hkv * g * c].view(hkv, g, c)
                                    for o, c in zip(offsets, lens)]
                                   for flat in (self.flat_scores, self.flat_probs))
        self.tables = None
        if use_native:
            self.tables = _tables(runs, lens, offsets)
            self.partial = torch.empty(len(self.tables[1]), hkv, g, d, **like)
            self.softmax = list(zip(self.scores, self.probs))  # one softmax per sequence,
            if len(set(lens)) == 1:  # or one for all where the contexts are as long
                self.softmax = [(self.flat_scores.view(-1, lens[0]), self.flat_probs.view(-1, lens[0]))]
            return
        self.q_views, self.out_views = list(self.q.unbind(0)), list(self.out.unbind(0))
        self.run_scores, self.p_views = [], []
        for seq_runs, scores, probs in zip(runs, self.scores, self.probs):
            starts = [0]
            for _, n in seq_runs[:-1]:
                starts.append(starts[-1] + n)
            self.run_scores.append([scores] if len(seq_runs) == 1 else
                                   [torch.empty(hkv, g, n, **like) for _, n in seq_runs])
            self.p_views.append([probs[:, :, o: o + n] for o, (_, n) in zip(starts, seq_runs)])
        self.k_runs = [[_run_view(k_cache, a, n, True) for a, n in seq_runs] for seq_runs in runs]
        self.v_runs = [[_run_view(v_cache, a, n, False) for a, n in seq_runs] for seq_runs in runs]


def _run_view(cache: torch.Tensor, a: int, n: int, transposed: bool) -> tuple[torch.Tensor, ...]:
    """Slots a..a+n of cache [L, Hkv, S, D] in every layer, views: [Hkv, D, n] (transposed) or
    [Hkv, n, D] each."""
    layers, hkv, _, d = cache.shape
    (ls, hs, ss, ds), base = cache.stride(), cache.storage_offset() + a * cache.stride(2)
    if transposed:
        return cache.as_strided((layers, hkv, d, n), (ls, hs, ds, ss), base).unbind(0)
    return cache.as_strided((layers, hkv, n, d), (ls, hs, ss, ds), base).unbind(0)


def _tables(runs: list[list[tuple[int, int]]], lens: list[int],
            offsets: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernels' pieces, chunks and sequences (cpu_decode.cpp): each context's runs cut into
    chunks of at most CHUNK keys."""
    pieces, chunks, seqs = [], [], []
    for s, seq_runs in enumerate(runs):
        first_chunk, key = len(chunks), 0
        for a, n in seq_runs:
            while n:
                if key % CHUNK == 0:
                    chunks.append([s, len(pieces), len(pieces), key])
                take = min(n, CHUNK - key % CHUNK)
                pieces.append([a, take])
                chunks[-1][2] += 1
                a, n, key = a + take, n - take, key + take
        seqs.append([lens[s], offsets[s], first_chunk, len(chunks)])
    return (torch.tensor(pieces, dtype=torch.long).view(-1, 2),
            torch.tensor(chunks, dtype=torch.long).view(-1, 4),
            torch.tensor(seqs, dtype=torch.long).view(-1, 4))
