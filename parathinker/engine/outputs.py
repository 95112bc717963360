"""What a generation returns: per-path and summary token ids, texts and finish reasons."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# `logprobs` (when the engine was asked for them): per token id, (logprob, top ids, top
# logprobs) under the distribution it was drawn from (`sampler.logprobs_rows`), or None for a
# token the engine forced (the summary template, rewritten tags)


@dataclass
class PathOutput:
    index: int  # 1-based path index k
    token_ids: list[int]  # starts with <think{k}>, ends with </think{k}>
    text: str  # the path's text, without its two tags
    finish_reason: str  # "end" | "budget" | "cut"
    logprobs: list[Any] | None = None  # per token id, see above


@dataclass
class SummaryOutput:
    token_ids: list[int]  # starts with the summary template's tokens
    text: str  # without the leading <summary> and the trailing </summary> / EOS
    finish_reason: str  # "end" | "budget" | "stop" (a server stop string; "failed" /
    # "aborted" when the request did not run)
    logprobs: list[Any] | None = None  # per token id, see above


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    paths: list[PathOutput]
    summary: SummaryOutput
    answer: str | None  # content of the summary's last \boxed{...}
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None  # set when the engine could not run the request

    @property
    def num_path_tokens(self) -> int:
        return sum(len(p.token_ids) for p in self.paths)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SequentialOutput:
    """One plain reasoning trace (sequential / majority baselines)."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "end" (EOS) | "budget"
    answer: str | None  # the last \boxed{...} of the text
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
