"""Dense-masked attention in plain torch (CPU and GPU): the tokens of one forward attend only to
each other through a boolean mask (training rows, the test oracle). Tensors are [B, L, ...].

The model's other attention metadata: `attention.flex.FlexAttention` (packed training rows under
a FlexAttention block mask) and `attention.pool.PagedAttention` (the engine: new tokens written
into the paged KV pool, each sequence attending to its context in place). Each knows how its
tokens attend: the model calls `meta.attend(...)`, whichever it was given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class DenseAttention:
    mask: torch.Tensor  # [B, L, L] bool, True where the query (row) may see the key (column)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_cache: Any = None) -> torch.Tensor:
        """q: [B, L, Hq, D], k/v: [B, L, Hkv, D] (after RoPE and thought embedding) -> [B, L, Hq, D];
        no KV cache (layer and kv_cache are the paged metadata's, unused here)."""
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=self.mask[:, None], enable_gqa=True,
        )
        return out.transpose(1, 2)
