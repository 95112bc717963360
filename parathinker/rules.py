"""The control-token rules of SPEC §5, shared by the reference generator and the engine.

Paths: tags and summary tokens are never emitted; any end token (</think{j}>, </think>, EOS) ends
the path with its own </think{k}>; a path holds at most max_path_tokens tokens (tags included);
end tokens are masked until the path could hold min_path_tokens. Summary: every path tag, the base
think tags, <summary> and the pad are masked; </summary> or EOS ends it.
"""

from __future__ import annotations

import torch

from parathinker.config import SamplingParams
from parathinker.tokens import ControlTokens

END, BUDGET, CUT = "end", "budget", "cut"


class TokenRules:
    def __init__(self, ctrl: ControlTokens, device: torch.device | str) -> None:
        self.ctrl = ctrl
        self.path_banned = torch.tensor(ctrl.path_banned_ids(), device=device)
        self.path_end = torch.tensor(ctrl.path_end_ids(), device=device)
        self.path_end_set = frozenset(ctrl.path_end_ids())
        self.summary_banned = torch.tensor(ctrl.summary_banned_ids(), device=device)
        self.summary_end_set = frozenset(ctrl.summary_end_ids())

    def mask_path_logits(self, logits: torch.Tensor, can_end: list[bool]) -> torch.Tensor:
        """logits: [R, V] float32, one row per path to sample; modified in place."""
        logits[:, self.path_banned] = float("-inf")
        blocked = [r for r, ok in enumerate(can_end) if not ok]
        if blocked:
            rows = torch.tensor(blocked, device=logits.device)
            logits[rows[:, None], self.path_end[None, :]] = float("-inf")
        return logits

    def mask_summary_logits(self, logits: torch.Tensor) -> torch.Tensor:
        logits[:, self.summary_banned] = float("-inf")
        return logits

    def think_close(self, k: int) -> int:
        return self.ctrl.think_close[k - 1]


def is_at_budget(num_held: int, params: SamplingParams) -> bool:
    """A path holding max_path_tokens - 1 tokens must close now (no sampling)."""
    return num_held >= params.max_path_tokens - 1


def can_end(num_held: int, params: SamplingParams) -> bool:
    """Ending now makes the path hold num_held + 1 tokens; allowed once that reaches the minimum."""
    return num_held + 1 >= params.min_path_tokens


def apply_path_choice(rules: TokenRules, k: int, chosen: int) -> tuple[int, str | None]:
    """The token path k keeps for a sampled `chosen`, and its finish reason if it ends."""
    if chosen in rules.path_end_set:
        return rules.think_close(k), END
    return chosen, None


def should_stop_thinking(num_finished: int, params: SamplingParams) -> bool:
    return num_finished >= params.min_finished_paths
