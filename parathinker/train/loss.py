"""The training forward: packed rows -> summed cross-entropy over their targets.

Attention metadata comes from the layout, two ways with one rule (`parathinker.spec.layout.can_see`):
"flex" builds a FlexAttention block mask (no L x L tensor once compiled: GPU, 28K-token rows);
"sdpa" builds a dense [B, L, L] boolean mask (CPU, small rows, and the tests' slow twin).

The loss never materialises [L, V] float32 logits: only positions with a target go through the
LM head, in chunks of `chunk_tokens`, each chunk checkpointed (its logits are recomputed in the
backward pass), so memory holds one chunk's logits at a time.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from parathinker.attention.dense import DenseAttention
from parathinker.model.decoder import ParaThinkerForCausalLM
from parathinker.train.request_row import dense_mask
from parathinker.train.pack import IGNORE

ATTENTION_BACKENDS = ("sdpa", "flex")


def attention_meta(regions: torch.Tensor, doc_ids: torch.Tensor, backend: str,
                   mask_builder: Any = None) -> Any:
    """[B, L] regions and document ids -> the metadata the model's forward takes."""
    if backend == "sdpa":
        return DenseAttention(dense_mask(regions, doc_ids))
    if backend == "flex":
        from parathinker.attention.flex import build_block_mask

        return (mask_builder or build_block_mask)(regions, doc_ids)
    raise ValueError(f"unknown attention backend {backend!r}; use one of {ATTENTION_BACKENDS}")


def _chunk_loss(model: ParaThinkerForCausalLM, hidden: torch.Tensor,
                targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model.compute_logits(hidden), targets, reduction="sum")


def token_loss_sum(model: ParaThinkerForCausalLM, hidden: torch.Tensor, targets: torch.Tensor,
                   chunk_tokens: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [B, L, H], targets [B, L] (-100: none) -> (float32 sum of the token losses,
    number of targets)."""
    selected = targets.ne(IGNORE)
    h, t = hidden[selected], targets[selected]  # [N, H], [N]
    if h.shape[0] == 0:  # still a graph, so that every rank runs a backward pass
        return hidden.float().sum() * 0.0, selected.sum()
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    recompute = torch.is_grad_enabled() and h.requires_grad and h.shape[0] > chunk_tokens
    for start in range(0, h.shape[0], chunk_tokens):
        hs, ts = h[start:start + chunk_tokens], t[start:start + chunk_tokens]
        if recompute:
            total = total + checkpoint(_chunk_loss, model, hs, ts, use_reentrant=False)
        else:
            total = total + _chunk_loss(model, hs, ts)
    return total, selected.sum()


class TrainForward(nn.Module):
    """The model plus its loss, as one module: distributed wrappers (DDP, FSDP, DeepSpeed) see
    the LM head used inside their forward. State-dict keys are the model's, prefixed `model.`."""

    def __init__(self, model: ParaThinkerForCausalLM, attention: str = "sdpa",
                 chunk_tokens: int = 4096, compile_mask: bool = False) -> None:
        super().__init__()
        if attention not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {attention!r}; use one of "
                             f"{ATTENTION_BACKENDS}")
        self.model = model
        self.attention = attention
        self.chunk_tokens = chunk_tokens
        self.mask_builder = None
        if compile_mask:  # torch.compile'd, create_block_mask never builds the L x L mask
            from parathinker.attention.flex import build_block_mask

            self.mask_builder = torch.compile(build_block_mask)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, segment_ids: torch.Tensor,
                regions: torch.Tensor, doc_ids: torch.Tensor,
                targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attn = attention_meta(regions, doc_ids, self.attention, self.mask_builder)
        hidden = self.model(input_ids, positions, segment_ids, attn)
        return token_loss_sum(self.model, hidden, targets, self.chunk_tokens)
