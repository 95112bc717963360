"""Attention dispatch, and dense-masked attention in plain torch (CPU and GPU).

Three kinds of attention metadata, passed explicitly into the model's forward:

- `DenseAttention`: the tokens of this forward attend only to each other through a boolean
  mask (training rows, the test oracle). Tensors are [B, L, ...].
- `attention.paged.PagedAttention`: new tokens are written into the paged KV pool, then each
  sequence attends to its context (runs of slots: the prompt's, the paths', its own) in place.
  Tokens are flat ([1, N]). P paths share the prompt's slots and the summary reads the prompt's
  and every path's slots without copying anything.
- `attention.flex.FlexAttention`: packed training rows under a FlexAttention block mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from parathinker.attention.paged import PagedAttention, PagedKVCache, paged_attend


@dataclass
class DenseAttention:
    mask: torch.Tensor  # [B, L, L] bool, True where the query (row) may see the key (column)


def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           meta: Any, kv_cache: PagedKVCache | None) -> torch.Tensor:
    """q: [B, L, Hq, D], k/v: [B, L, Hkv, D] (after RoPE and thought embedding) -> [B, L, Hq, D]."""
    if isinstance(meta, PagedAttention):
        assert kv_cache is not None and q.shape[0] == 1, "paged attention takes flat tokens"
        return paged_attend(layer, q, k, v, meta, kv_cache)
    if not isinstance(meta, DenseAttention):  # FlexAttention (training)
        from parathinker.attention.flex import flex_attend

        return flex_attend(q, k, v, meta)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=meta.mask[:, None], enable_gqa=True,
    )
    return out.transpose(1, 2)
