"""Token choice from logits: temperature (0 = greedy), top-k, top-p, with an explicit generator.

Sampling draws on the CPU from a per-request `torch.Generator`, so a seed gives the same tokens on
any device and in any batch composition (given the same logits).
"""

from __future__ import annotations

import torch

from parathinker.tokens import ControlTokens


class LogitMasks:
    """Bans the tokens SPEC §5 forbids, on [R, V] float32 logits, in place."""

    def __init__(self, ctrl: ControlTokens, device: torch.device | str) -> None:
        self.path_banned = torch.tensor(ctrl.path_banned_ids(), device=device)
        self.path_end = torch.tensor(ctrl.path_end_ids(), device=device)
        self.summary_banned = torch.tensor(ctrl.summary_banned_ids(), device=device)

    def paths(self, logits: torch.Tensor, can_end: list[bool]) -> torch.Tensor:
        """One row per path to sample; rows with can_end False also lose every end token."""
        logits[:, self.path_banned] = float("-inf")
        blocked = [r for r, ok in enumerate(can_end) if not ok]
        if blocked:
            rows = torch.tensor(blocked, device=logits.device)
            logits[rows[:, None], self.path_end[None, :]] = float("-inf")
        return logits

    def summary(self, logits: torch.Tensor) -> torch.Tensor:
        logits[:, self.summary_banned] = float("-inf")
        return logits


def sample(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0,
           generator: torch.Generator | None = None) -> list[int]:
    """logits: [R, V] float32 with banned tokens already at -inf -> one token id per row."""
    if temperature == 0:
        return logits.argmax(-1).tolist()
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = (cum - sorted_logits.softmax(-1)) >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1).cpu()
    return torch.multinomial(probs, 1, generator=generator)[:, 0].tolist()


def make_generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen
