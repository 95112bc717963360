"""Reference attention in plain torch (CPU and GPU): dense-masked and KV-cache backends.

Two kinds of attention metadata, passed explicitly into the model's forward:

- `DenseAttention`: the tokens of this forward attend only to each other through a boolean
  mask (training rows, the test oracle). Tensors are [B, L, ...].
- `CacheAttention`: new tokens are written into a preallocated KV pool at `slot_mapping`, then
  each sequence attends to the slots of its context, in order; its query tokens are the last
  `query_lens[s]` entries of that context (causal among themselves). Tokens are flat ([1, N]).
  A context is any list of slots, so P paths can share the prompt's slots and the summary can
  read the prompt's and every path's slots without copying anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class DenseAttention:
    mask: torch.Tensor  # [B, L, L] bool, True where the query (row) may see the key (column)


@dataclass
class KVCache:
    """The KV pool: one slot per cached token, per layer."""

    k: torch.Tensor  # [num_layers, num_slots, Hkv, D]
    v: torch.Tensor  # [num_layers, num_slots, Hkv, D]

    @classmethod
    def allocate(cls, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> KVCache:
        shape = (num_layers, num_slots, num_kv_heads, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(shape, dtype=dtype, device=device))

    @property
    def num_slots(self) -> int:
        return self.k.shape[1]


@dataclass
class CacheGroup:
    """Sequences of similar context length, padded together."""

    query_index: torch.Tensor  # [S, Qmax] flat index of each sequence's queries (padded)
    query_valid: torch.Tensor  # [S, Qmax] bool
    context_slots: torch.Tensor  # [S, C] slots of each sequence's context (padded with 0)
    mask: torch.Tensor  # [S, Qmax, C] bool

    def grouped_mask(self, group: int) -> torch.Tensor:
        """[S, 1, G*Qmax, C]: the mask repeated for the G query heads that share a KV head."""
        s, q, c = self.mask.shape
        return self.mask[:, None, None].expand(s, 1, group, q, c).reshape(s, 1, group * q, c)


@dataclass
class CacheAttention:
    slot_mapping: torch.Tensor  # [N] slot of each new token
    groups: list[CacheGroup]

    @classmethod
    def build(cls, query_lens: Sequence[int], contexts: Sequence[Sequence[int]],
              device: torch.device | str) -> CacheAttention:
        """Sequences in flat order: sequence s owns the next `query_lens[s]` tokens of the batch,
        whose slots are the last `query_lens[s]` entries of `contexts[s]`. Sequences are padded
        in groups of similar context length (at most 2x apart), so one long summary context does
        not pad every short path context to its length."""
        starts, slot_mapping = [], []
        for s, (q, ctx) in enumerate(zip(query_lens, contexts)):
            if not 1 <= q <= len(ctx):
                raise ValueError(f"sequence {s}: {q} queries for a context of {len(ctx)}")
            starts.append(len(slot_mapping))
            slot_mapping += ctx[len(ctx) - q:]
        order = sorted(range(len(contexts)), key=lambda s: len(contexts[s]))
        groups, current = [], [order[0]]
        for s in order[1:]:
            if len(contexts[s]) > 2 * len(contexts[current[0]]):
                groups.append(current)
                current = []
            current.append(s)
        groups.append(current)
        return cls(torch.tensor(slot_mapping, dtype=torch.long, device=device),
                   [_build_group([query_lens[s] for s in g], [contexts[s] for s in g],
                                 [starts[s] for s in g], device) for g in groups])


def _build_group(query_lens: list[int], contexts: list[Sequence[int]], starts: list[int],
                 device: torch.device | str) -> CacheGroup:
    num_seqs = len(query_lens)
    q_max, c_max = max(query_lens), max(len(c) for c in contexts)
    query_index = torch.zeros(num_seqs, q_max, dtype=torch.long)
    context_slots = torch.zeros(num_seqs, c_max, dtype=torch.long)
    for s, (q, ctx, start) in enumerate(zip(query_lens, contexts, starts)):
        query_index[s, :q] = torch.arange(start, start + q)
        context_slots[s, : len(ctx)] = torch.tensor(ctx)
    q_lens = torch.tensor(query_lens)
    c_lens = torch.tensor([len(c) for c in contexts])
    qi = torch.arange(q_max)[None, :, None]
    ci = torch.arange(c_max)[None, None, :]
    last_visible = (c_lens - q_lens)[:, None, None] + qi  # causal among the queries
    mask = (ci <= last_visible) & (ci < c_lens[:, None, None])  # [S, Qmax, C]
    return CacheGroup(query_index.to(device), (qi[..., 0] < q_lens[:, None]).to(device),
                      context_slots.to(device), mask.to(device))


def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           meta: Any, kv_cache: KVCache | None) -> torch.Tensor:
    """q: [B, L, Hq, D], k/v: [B, L, Hkv, D] (after RoPE and thought embedding) -> [B, L, Hq, D]."""
    if not isinstance(meta, (DenseAttention, CacheAttention)):  # FlexAttention (training)
        from parathinker.attention.flex import flex_attend

        return flex_attend(q, k, v, meta)
    if isinstance(meta, DenseAttention):
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=meta.mask[:, None], enable_gqa=True,
        )
        return out.transpose(1, 2)
    assert kv_cache is not None and q.shape[0] == 1, "cache attention takes flat tokens"
    k_pool, v_pool = kv_cache.k[layer], kv_cache.v[layer]
    k_pool[meta.slot_mapping] = k[0]
    v_pool[meta.slot_mapping] = v[0]
    heads, kv_heads, dim = q.shape[2], k.shape[2], q.shape[3]
    group = heads // kv_heads
    out = torch.empty_like(q[0])
    for g in meta.groups:
        k_ctx = k_pool[g.context_slots].transpose(1, 2)  # [S, Hkv, C, D]
        v_ctx = v_pool[g.context_slots].transpose(1, 2)
        num_seqs, q_max = g.query_index.shape
        # Fold the query heads sharing a KV head into the query axis: K/V are never repeated.
        q_seq = q[0][g.query_index].view(num_seqs, q_max, kv_heads, group, dim)
        q_seq = q_seq.permute(0, 2, 3, 1, 4).reshape(num_seqs, kv_heads, group * q_max, dim)
        o = F.scaled_dot_product_attention(q_seq, k_ctx, v_ctx, attn_mask=g.grouped_mask(group))
        o = o.view(num_seqs, kv_heads, group, q_max, dim).permute(0, 3, 1, 2, 4)
        o = o.reshape(num_seqs, q_max, heads, dim)
        out[g.query_index[g.query_valid]] = o[g.query_valid]
    return out[None]
