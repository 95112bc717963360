"""FlexAttention backend for packed training rows: a block mask built from the layout's visibility
rule (`parathinker.spec.layout.can_see`), never an L x L tensor. Imported only when used."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class FlexAttention:
    block_mask: Any  # torch.nn.attention.flex_attention.BlockMask over [B, L, L]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_cache: Any = None) -> torch.Tensor:
        """The model's call (as attention.dense.DenseAttention.attend): no KV cache."""
        return flex_attend(q, k, v, self)


def build_block_mask(regions: torch.Tensor, doc_ids: torch.Tensor) -> FlexAttention:
    """regions, doc_ids: [B, L] (same device as the model) -> the packed rows' block mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    from parathinker.spec.layout import can_see

    def mask_mod(b, h, q_idx, kv_idx):
        return can_see(q_idx, kv_idx, regions[b, q_idx], regions[b, kv_idx],
                       doc_ids[b, q_idx], doc_ids[b, kv_idx])

    batch, length = regions.shape
    mask = create_block_mask(mask_mod, batch, None, length, length, device=regions.device)
    return FlexAttention(mask)


def flex_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: FlexAttention) -> torch.Tensor:
    """q: [B, L, Hq, D], k/v: [B, L, Hkv, D] -> [B, L, Hq, D]."""
    from torch.nn.attention.flex_attention import flex_attention

    out = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                         block_mask=meta.block_mask, enable_gqa=True)
    return out.transpose(1, 2)
