"""Gated parallel thinking (issue 23, an extension of SPEC §5): per-path confidence, pruning and
stopping on agreement. The engine (`Request`) and its slow twin state these rules separately.

Confidence, DeepConf's definition on the distribution the engine's `logprobs` output reports
(`sampler.logprobs_rows`: SPEC §5 masks, then temperature, top-k and top-p, renormalized; a greedy
row at temperature 1 with its filters):
- a sampled path token's confidence is -mean of the row's top `confidence_top_k` log-probabilities
  (k capped at the vocabulary), each floored at LOGPROB_FLOOR (-9999.0, the value the server
  reports for -inf, as vLLM does): a token the filters dropped (-inf) counts as -9999, so the value
  is always finite and a test can recompute it from the engine's own top_logprobs. Only drawn
  tokens have one: a path's opening tag and a tag the engine forces (budget, cut) do not; the token
  drawn in the step a path is pruned does (its confidence is what pruned it);
- a group confidence is the mean (math.fsum / W) of the last W = `confidence_window` token
  confidences; a path's confidence is its lowest group confidence over every full window, or the
  mean of what it has while it holds fewer than W (None before its first drawn token).

Torch-free but for `token_confidence`, which computes it on the device for every gated path row of
a step in one batched op; it reaches the host with the step's tokens, in the same transfer.

Pruning (`prune_confidence`): after a path draws a token that does not end it, a full window whose
group confidence is below the threshold closes the path at that step: it gets its </think{k}> in
place of the drawn token, finish reason "pruned". At least one path is never pruned: a prune
that would leave every path pruned keeps, of the paths that fall below in that step, the one with
the highest group confidence (the lowest index on a tie).

Agreement (`stop_on_agreement` = A > 0): a path that ends by itself ("end") or at its budget
gets an answer key once (`Request.answer_of`: the last \\boxed{} of its text, normalised by
`spec.answers.normalize_answer`; string equality, not math-verify). When A finished paths share a
key, thinking ends. Thinking ends at the first of: `min_finished_paths` paths ended ("end" or
"budget"), A paths agree, or no path is open; the open paths are then cut ("cut"). A pruned path
counts for none of these rules: the summary sees it as a finished path (its tokens with its end
tag), nothing else does. The reference layout refuses gated params (`check_ungated`).
"""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING

from parathinker.config import SamplingParams

if TYPE_CHECKING:
    import torch

    from parathinker.engine.sampler import SamplingTensors

LOGPROB_FLOOR = -9999.0  # also what the server reports for -inf (serve/choices.py)


def token_confidence(logits: torch.Tensor, st: SamplingTensors,
                     top_k: list[int]) -> torch.Tensor:
    """logits [R, V] float32 (masks applied) and the rows' sampling tensors -> [R] float64 token
    confidences, with top_k[r] log-probabilities for row r; on the logits' device, no host read.
    (torch is imported here: the rest of this module is the request state's pure Python.)"""
    import torch

    from parathinker.engine.sampler import filtered_logits

    logprobs = filtered_logits(logits, st).log_softmax(-1)
    num_vocab = logprobs.shape[-1]
    k_max = min(max(top_k), num_vocab)
    # float64 for the mean of the float32 log-probabilities: as a host sum of the reported
    # top_logprobs would compute it, to ~1e-15
    top = logprobs.topk(k_max, dim=-1).values.clamp_(min=LOGPROB_FLOOR).double()  # [R, k_max]
    if min(top_k) >= k_max:
        return -top.mean(-1)
    k = torch.tensor([min(k, num_vocab) for k in top_k], device=logits.device)
    keep = torch.arange(k_max, device=logits.device)[None, :] < k[:, None]
    return -(top * keep).sum(-1) / k


class PathConfidence:
    """One path's rolling window of token confidences (host floats)."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.recent: deque[float] = deque(maxlen=window)
        self.lowest: float | None = None  # lowest group confidence over full windows

    def add(self, confidence: float) -> float | None:
        """Take a drawn token's confidence; return the group confidence once the window is full."""
        self.recent.append(confidence)
        if len(self.recent) < self.window:
            return None
        group = math.fsum(self.recent) / self.window
        self.lowest = group if self.lowest is None else min(self.lowest, group)
        return group

    @property
    def value(self) -> float | None:
        """The path's confidence: its lowest group confidence, or the mean of a short path."""
        if self.lowest is not None:
            return self.lowest
        return math.fsum(self.recent) / len(self.recent) if self.recent else None


def to_prune(below: dict[int, float], num_unpruned: int) -> list[int]:
    """Paths (0-based) to prune now, of those whose group confidence fell below the threshold
    (`below`: path -> group confidence); `num_unpruned` paths are not pruned before this step."""
    if len(below) < num_unpruned:
        return sorted(below)
    best = max(sorted(below), key=lambda k: below[k])  # the first of the highest
    return sorted(k for k in below if k != best)


def check_ungated(params: SamplingParams) -> None:
    """The reference layout runs the released engine's control flow, which has no gating."""
    if params.is_gated:
        raise ValueError("confidence_window, prune_confidence and stop_on_agreement are not "
                         "supported in the reference layout (SPEC §6 has no gating); use "
                         "layout='native'")
