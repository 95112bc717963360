"""The control-token rules of SPEC §5 as pure functions of ints (no torch): shared by the
slow twin and the engine's scheduler. The logit masks live in `sampler.LogitMasks`.

Paths: tags and summary tokens are never emitted; any end token (</think{j}>, </think>, EOS) ends
the path with its own </think{k}>; a path holds at most max_path_tokens tokens (tags included);
end tokens are masked until the path could hold min_path_tokens. Summary: every path tag, the base
think tags, <summary> and the pad are masked; </summary> or EOS ends it.
"""

from __future__ import annotations

from parathinker.config import SamplingParams
from parathinker.spec.tokens import ControlTokens

END, BUDGET, CUT = "end", "budget", "cut"
PRUNED = "pruned"  # a path closed by prune_confidence (gated thinking, engine/confidence.py)


def is_at_budget(num_held: int, params: SamplingParams) -> bool:
    """A path holding max_path_tokens - 1 tokens must close now (no sampling)."""
    return num_held >= params.max_path_tokens - 1


def can_end(num_held: int, params: SamplingParams) -> bool:
    """Ending now makes the path hold num_held + 1 tokens; allowed once that reaches the minimum."""
    return num_held + 1 >= params.min_path_tokens


def path_choice(ctrl: ControlTokens, k: int, chosen: int) -> tuple[int, str | None]:
    """The token path k (1-based) keeps for a sampled `chosen`, and its finish reason if it ends."""
    if chosen in ctrl.path_end_set:
        return ctrl.think_close[k - 1], END
    return chosen, None


def summary_choice(ctrl: ControlTokens, chosen: int, num_held: int,
                   params: SamplingParams) -> str | None:
    """Finish reason of the summary after appending `chosen` (it now holds num_held tokens)."""
    if chosen in ctrl.summary_end_set:
        return END
    return BUDGET if num_held >= params.max_summary_tokens else None


def should_stop_thinking(num_finished: int, params: SamplingParams) -> bool:
    return num_finished >= params.min_finished_paths
