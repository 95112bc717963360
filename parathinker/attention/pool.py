"""The paged KV pool, one step's attention metadata over it, and the interface of its backends.

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
them and see the whole rest of the context. A backend (`PagedBackend`, picked once by
`attention.paged.backend_for`) builds this metadata, adding what it prepares once per step for
every layer (`state`), and attends with it; the metadata carries its backend, so the model calls
`meta.attend(...)` and never asks which backend it has.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


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


class PagedBackend(Protocol):
    """One way to attend over the pool: `attention.runs`, `attention.flex_paged`,
    `attention.gathered` (the slow twin the others are tested against)."""

    name: str  # as LLM(attention=...) and --attention spell it
    zeroed_pool: bool  # the pool must start finite (PagedKVCache.allocate)
    wants_one_run: bool  # reads a context faster in fewer runs: colliding sequences move (BlockManager.move)

    def build_metadata(self, query_lens: Sequence[int],
                       contexts: Sequence[Sequence[tuple[int, int]]],
                       device: torch.device | str) -> PagedAttention:
        """contexts[s]: runs (start slot, length) of sequence s's context, whose last
        query_lens[s] slots are its new tokens. Once per step."""
        ...

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_cache: PagedKVCache, meta: PagedAttention) -> torch.Tensor:
        """Writes k, v at meta.slot_mapping, then attends. q: [1, N, Hq, D], k/v: [1, N, Hkv, D]
        (flat tokens) -> [1, N, Hq, D]. Once per layer."""
        ...


@dataclass
class PagedAttention:
    """Metadata of one step (see the module docstring). Host lists describe the runs; `state` is
    what `backend` builds once per step for every layer (the flex block mask; the runs backend's
    batch of short decodes)."""

    slot_mapping: torch.Tensor  # [N] int64, on the model's device
    qo_indptr: list[int]  # [S+1]
    kv_indptr: list[int]  # [S+1]
    run_start: list[int]  # [R]
    run_len: list[int]  # [R]
    backend: PagedBackend
    state: Any = field(default=None, repr=False)

    @classmethod
    def of_runs(cls, query_lens: Sequence[int], contexts: Sequence[Sequence[tuple[int, int]]],
                device: torch.device | str, backend: PagedBackend) -> PagedAttention:
        """The lists every backend shares (see PagedBackend.build_metadata); no state yet."""
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
        return cls(torch.cat(slots).to(device), qo, kv, starts, lens, backend)

    @property
    def num_seqs(self) -> int:
        return len(self.qo_indptr) - 1

    def runs(self, s: int) -> list[tuple[int, int]]:
        a, b = self.kv_indptr[s], self.kv_indptr[s + 1]
        return list(zip(self.run_start[a:b], self.run_len[a:b]))

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_cache: PagedKVCache | None) -> torch.Tensor:
        """The model's call (model.decoder): this step's backend attends."""
        assert kv_cache is not None and q.shape[0] == 1, "paged attention takes flat tokens"
        return self.backend.attend(layer, q, k, v, kv_cache, self)


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


def attend_each(q: torch.Tensor, out: torch.Tensor, meta: PagedAttention, seqs: Sequence[int],
                one: Callable[[torch.Tensor, list[tuple[int, int]]], torch.Tensor]) -> None:
    """out[tokens of s] = one(q[tokens of s], runs of s) for each sequence s in seqs.
    q, out: [N, Hq, D] (flat tokens)."""
    for s in seqs:
        a, b = meta.qo_indptr[s], meta.qo_indptr[s + 1]
        out[a:b] = one(q[a:b], meta.runs(s))


def runs_of(slots: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive slots as (start, length) runs: [3, 4, 5, 9] -> [(3, 3), (9, 1)]."""
    runs: list[tuple[int, int]] = []
    for s in slots:
        if runs and runs[-1][0] + runs[-1][1] == s:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((s, 1))
    return runs
