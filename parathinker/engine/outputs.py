"""What a generation returns (per-path and summary token ids, texts and finish reasons), and the
one place it is built from engine requests: `request_output`, `trace_output`, and the text rules
(`summary_text_ids`, `trace_text_ids`, `first_stop`; the path rule is spec's `path_text_ids`).
Torch-free."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

# `logprobs` (when the engine was asked for them): per token id, (logprob, top ids, top
# logprobs) under the distribution it was drawn from (`sampler.logprobs_rows`); a summary-template
# token gets its own under the summary's distribution at its position (computed in the forward
# that computes the template: `SeqWork.forced`); None for a token otherwise forced (rewritten tags)


@dataclass
class PathOutput:
    index: int  # 1-based path index k
    token_ids: list[int]  # starts with <think{k}>, ends with </think{k}>
    text: str  # the path's text, without its two tags
    finish_reason: str  # "end" | "budget" | "cut" | "pruned" (closed by prune_confidence)
    logprobs: list[Any] | None = None  # per token id, see above
    # the path's lowest group confidence (engine/confidence.py); None when confidence_window is 0
    confidence: float | None = None
    answer: str | None = None  # the last \boxed{...} of the path's text (every path)


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


# ----- the output rules, stated once: LLM.generate, the eval engine backend and the server
# (engine/output_processor.py for streams, serve/choices.py for final choices) all call these
class SummaryTextIds:
    """The ids a summary's text shows: without its first token (<summary>: every summary
    starts with it, the Engine checks its template) and, when it ended by itself ("end"),
    without its end token (</summary> or EOS, the last token of the step that ended it). Fed as
    the summary grows (`add`: the step's new ids and its finish reason, if it ended in this
    step; returns the newly shown ids), or at once (`summary_text_ids`)."""

    def __init__(self) -> None:
        self.is_started = False

    def add(self, token_ids: list[int], finish_reason: str | None) -> list[int]:
        ids = list(token_ids)
        if ids and not self.is_started:
            ids, self.is_started = ids[1:], True
        return ids[:-1] if ids and finish_reason == "end" else ids


def summary_text_ids(token_ids: list[int], finish_reason: str | None) -> list[int]:
    """All of a summary's text ids (`SummaryTextIds`)."""
    return SummaryTextIds().add(token_ids, finish_reason)


def trace_text_ids(token_ids: list[int], finish_reason: str | None) -> list[int]:
    """The ids a plain trace's text shows: without its EOS when it ended by itself."""
    return list(token_ids[:-1] if finish_reason == "end" else token_ids)


def first_stop(text: str, stop: tuple[str, ...], start: int = 0) -> int | None:
    """Index of the earliest occurrence at or after `start` of any stop string, or None."""
    hits = [i for i in (text.find(s, start) for s in stop) if i >= 0]
    return min(hits) if hits else None


def build_output(prompt_ids: list[int], path_token_ids: list[list[int]], path_finish: list[str],
                 summary_token_ids: list[int], summary_finish: str, num_forward_tokens: int,
                 latency_s: float, tokenizer: Any, ctrl: Any,
                 path_confidence: list[float | None] | None = None) -> RequestOutput:
    """A finished ParaThinker request's output: each path's and the summary's text by the rules
    above, the answers (the last \\boxed{} of each path's and of the summary's text), each path's
    confidence (None: not computed) and the timing metrics."""
    from parathinker.spec.reference_layout import path_text_ids
    from parathinker.spec.tokens import last_boxed

    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    texts = [decode(path_text_ids(ids, ctrl.think_close[k])) for k, ids in enumerate(path_token_ids)]
    confidence = path_confidence or [None] * len(path_token_ids)
    paths = [PathOutput(k + 1, ids, text, reason, confidence=c, answer=last_boxed(text))
             for k, (ids, text, reason, c) in enumerate(zip(path_token_ids, texts, path_finish,
                                                           confidence))]
    text = decode(summary_text_ids(summary_token_ids, summary_finish))
    summary = SummaryOutput(summary_token_ids, text, summary_finish)
    num_generated = sum(len(p) for p in path_token_ids) + len(summary_token_ids)
    metrics = {"latency_s": latency_s, "num_forward_tokens": num_forward_tokens,
               "tokens_per_s": num_generated / max(latency_s, 1e-9)}
    return RequestOutput(prompt_ids, paths, summary, last_boxed(text), metrics)


def request_output(req: Any, tokenizer: Any, ctrl: Any) -> RequestOutput:
    """An engine request (`Request`, one sample) as a RequestOutput, `error` set if it did not
    finish; with logprobs where the request asked for them."""
    latency = (req.finish_time or time.perf_counter()) - req.arrival_time
    if req.status != "finished":
        return RequestOutput(req.prompt.tokens, [], SummaryOutput([], "", req.status), None,
                             {"latency_s": latency}, error=_why(req))
    summary = req.summary.tokens if req.summary else []
    out = build_output(req.prompt.tokens, [p.tokens for p in req.paths],
                       [str(f) for f in req.path_finish], summary, str(req.summary_finish),
                       req.num_forward_tokens, latency, tokenizer, ctrl, req.path_confidence)
    out.metrics["num_preemptions"] = req.num_preemptions
    if req.num_logprobs is not None and req.summary is not None:
        out.summary.logprobs = [req.summary.logprobs.get(i) for i in range(len(summary))]
        if req.path_logprobs:
            for p, seq in zip(out.paths, req.paths):
                p.logprobs = [seq.logprobs.get(i) for i in range(len(seq.tokens))]
    return out


def trace_output(req: Any, tokenizer: Any) -> SequentialOutput:
    """An engine plain trace (`PlainRequest`) as a SequentialOutput."""
    from parathinker.spec.tokens import last_boxed

    latency = (req.finish_time or time.perf_counter()) - req.arrival_time
    tokens = req.trace.tokens
    text = tokenizer.decode(trace_text_ids(tokens, req.trace_finish), skip_special_tokens=False)
    return SequentialOutput(
        req.prompt.tokens, tokens, text, str(req.trace_finish), last_boxed(text),
        {"latency_s": latency, "tokens_per_s": len(tokens) / max(latency, 1e-9)},
        None if req.status == "finished" else _why(req))


def _why(req: Any) -> str:
    return req.error or f"request {req.status}"
