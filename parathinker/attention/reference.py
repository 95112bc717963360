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
class CacheAttention:
    slot_mapping: torch.Tensor  # [N] slot of each new token
    query_index: torch.Tensor  # [S, Qmax] flat index of each sequence's queries (padded)
    query_valid: torch.Tensor  # [S, Qmax] bool
    context_slots: torch.Tensor  # [S, C] slots of each sequence's context (padded with 0)
    mask: torch.Tensor  # [S, 1, Qmax, C] bool

    @classmethod
    def build(cls, query_lens: Sequence[int], contexts: Sequence[Sequence[int]],
              device: torch.device | str) -> CacheAttention:
        """Sequences in flat order: sequence s owns the next `query_lens[s]` tokens of the batch,
        whose slots are the last `query_lens[s]` entries of `contexts[s]`."""
        num_seqs = len(query_lens)
        q_max, c_max = max(query_lens), max(len(c) for c in contexts)
        query_index = torch.zeros(num_seqs, q_max, dtype=torch.long)
        context_slots = torch.zeros(num_seqs, c_max, dtype=torch.long)
        q_lens = torch.tensor(query_lens)
        c_lens = torch.tensor([len(c) for c in contexts])
        slot_mapping, start = [], 0
        for s, (q, ctx) in enumerate(zip(query_lens, contexts)):
            if not 1 <= q <= len(ctx):
                raise ValueError(f"sequence {s}: {q} queries for a context of {len(ctx)}")
            query_index[s, :q] = torch.arange(start, start + q)
            context_slots[s, : len(ctx)] = torch.tensor(ctx)
            slot_mapping += ctx[len(ctx) - q :]
            start += q
        qi = torch.arange(q_max)[None, :, None]
        ci = torch.arange(c_max)[None, None, :]
        last_visible = (c_lens - q_lens)[:, None, None] + qi  # causal among the queries
        mask = (ci <= last_visible) & (ci < c_lens[:, None, None])  # [S, Qmax, C]
        return cls(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
            query_index=query_index.to(device),
            query_valid=(qi[..., 0] < q_lens[:, None]).to(device),
            context_slots=context_slots.to(device),
            mask=mask[:, None].to(device),
        )


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
    k_ctx = k_pool[meta.context_slots].transpose(1, 2)  # [S, Hkv, C, D]
    v_ctx = v_pool[meta.context_slots].transpose(1, 2)
    q_seq = q[0][meta.query_index].transpose(1, 2)  # [S, Hq, Qmax, D]
    o = F.scaled_dot_product_attention(q_seq, k_ctx, v_ctx, attn_mask=meta.mask, enable_gqa=True)
    o = o.transpose(1, 2)  # [S, Qmax, Hq, D]
    out = torch.empty_like(q[0])
    out[meta.query_index[meta.query_valid]] = o[meta.query_valid]
    return out[None]
