"""Decode attention over the paged KV pool in static shapes: what the graph path compiles and
captures (`engine.graphs`).

A decode-only step (every sequence forwards exactly one token) padded to a batch bucket B and a
context width W, all tensors on the model's device:

    slot_mapping [B]     the slot each row's new K/V is written to
    slots        [B, W]  each row's context slots (its own new slot included), padded
    lengths      [B]     how many of a row's slots are its context

Padding (rows past the step's sequences, columns past a row's length) points at the scratch
slot, one slot the block manager never hands out and that starts at zero: a masked column still
enters P @ V with weight 0, so what it reads must be finite. `attend` is tensor ops only (no
Python over sequences, no host sync, no data-dependent shape), so the whole decode forward is one
graph. It gathers every row's padded context per layer (B x W x Hkv x D reads, padding included):
on a GPU that costs bandwidth a FlexAttention block mask or FlashInfer over the pool would not;
those are the follow-up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from parathinker.attention.pool import PagedKVCache

MIN_WIDTH = 64  # smallest context width W (`width_bucket`)


def width_bucket(n: int) -> int:
    """The context width for a longest context of n slots, at least MIN_WIDTH: n rounded up to a
    multiple of a quarter of the power of two below it (4 widths per power of two: 65 -> 80,
    4,225 -> 5,120), so that padding adds under a quarter of n to what every layer gathers (a
    power of two added up to n, nearly doubling a 4K path's reads)."""
    n = max(n, MIN_WIDTH)
    step = 1 << ((n - 1).bit_length() - 3)
    return -(-n // step) * step


@dataclass
class StaticDecode:
    """One decode step's attention metadata (the module docstring); `attend` per layer."""

    slot_mapping: torch.Tensor  # [B] int64
    slots: torch.Tensor  # [B, W] int64
    lengths: torch.Tensor  # [B] int64

    @classmethod
    def build(cls, contexts: Sequence[Sequence[tuple[int, int]]], batch: int, scratch: int,
              device: torch.device | str) -> StaticDecode:
        """contexts[s]: runs (start slot, length) of row s's context, its new token's slot last;
        len(contexts) <= batch. The runs are expanded into slots by one vectorised op."""
        if not 1 <= len(contexts) <= batch:
            raise ValueError(f"{len(contexts)} sequences for a batch bucket of {batch}")
        starts = torch.tensor([a for runs in contexts for a, _ in runs], dtype=torch.long)
        run_lens = torch.tensor([n for runs in contexts for _, n in runs], dtype=torch.long)
        rows = torch.repeat_interleave(torch.arange(len(contexts)),
                                       torch.tensor([len(runs) for runs in contexts]))
        lengths = torch.full((batch,), 1, dtype=torch.long)
        lengths[: len(contexts)] = torch.zeros(len(contexts), dtype=torch.long).index_add_(
            0, rows, run_lens)
        if bool((lengths < 1).any()):
            raise ValueError("every decoding sequence needs a context holding its new token")
        slots = torch.full((batch, width_bucket(int(lengths.max()))), scratch, dtype=torch.long)
        total = int(run_lens.sum())
        run_first = torch.cumsum(run_lens, 0) - run_lens  # flat index of each run's first slot
        row_first = torch.cumsum(lengths, 0) - lengths  # flat index of each row's first slot
        flat = torch.arange(total)
        slot = flat + torch.repeat_interleave(starts - run_first, run_lens)
        row = torch.repeat_interleave(rows, run_lens)
        slots[row, flat - row_first[row]] = slot
        slot_mapping = torch.full((batch,), scratch, dtype=torch.long)
        slot_mapping[: len(contexts)] = slots[torch.arange(len(contexts)),
                                              lengths[: len(contexts)] - 1]
        return cls(slot_mapping.to(device), slots.to(device), lengths.to(device))

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_cache: PagedKVCache | None) -> torch.Tensor:
        """q: [1, B, Hq, D], k/v: [1, B, Hkv, D] (one new token per row) -> [1, B, Hq, D]."""
        assert kv_cache is not None
        # one index_put_ on the whole pool, every index a tensor: compiled, it stays in place (on
        # a view of the pool, Inductor copies the whole pool each call)
        heads = torch.arange(k.shape[2], device=q.device)[:, None]  # [Hkv, 1]
        at = (torch.full_like(heads, layer), heads, self.slot_mapping[None, :])  # -> [Hkv, B]
        kv_cache.k.index_put_(at, k[0].transpose(0, 1))  # [Hkv, B, D]
        kv_cache.v.index_put_(at, v[0].transpose(0, 1))
        k_pool, v_pool = kv_cache.k[layer], kv_cache.v[layer]  # [Hkv, S, D]
        kc = k_pool[:, self.slots].transpose(0, 1)  # [B, Hkv, W, D]
        vc = v_pool[:, self.slots].transpose(0, 1)
        width = self.slots.shape[1]
        visible = torch.arange(width, device=q.device)[None, :] < self.lengths[:, None]
        # The G = Hq / Hkv query heads of a KV head (heads h*G .. h*G+G-1, as enable_gqa pairs
        # them) are G query rows over that head's K/V, read once: not enable_gqa, which some
        # torch versions' masked CUDA kernels refuse (the math path then repeats K/V G times),
        # and which CPU runs slower (BENCHMARKS.md, "The graph path's decode attention").
        b, hq, d = q.shape[1:]
        hkv = kc.shape[1]
        out = F.scaled_dot_product_attention(q[0].view(b, hkv, hq // hkv, d), kc, vc,
                                             attn_mask=visible[:, None, None])
        return out.reshape(1, b, hq, d)
