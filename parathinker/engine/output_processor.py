"""A running request's outputs step by step: what each sample gained since the last step
(`Delta`: raw token ids and finish reasons), and its stop strings, checked once, on the summary's
generated text (the text after its template, by `outputs.summary_text_ids`), decoded as it grows.

    streams = [SampleStream(num_paths, stop, tokenizer, template_len) for _ in range(n)]
    after each Engine.step():  d = streams[i].delta(i, sample); streams[i].is_stop_hit(sample)

The server's engine loop publishes the Deltas (`serve/engine_loop.py`) and ends a sample whose
stop hit (`Engine.stop_sample`); `LLM.generate` and eval build whole outputs with
`outputs.request_output` instead. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from parathinker.engine.detokenize import IncrementalDetokenizer
from parathinker.engine.outputs import first_stop, summary_text_ids


@dataclass
class Delta:
    """What one sample of a request gained in one step (0-based path indices, raw token ids)."""

    index: int = 0  # the sample, 0..n-1
    path_tokens: dict[int, list[int]] = field(default_factory=dict)  # path -> new ids (tags too)
    path_finish: dict[int, str] = field(default_factory=dict)  # path -> end | budget | cut
    summary_tokens: list[int] = field(default_factory=list)  # new ids (the template first)
    summary_finish: str | None = None  # end | budget
    request: Any = None  # the ended sample (a Request), on its last Delta only
    status: str | None = None  # the request's status, on the last Delta
    error: str | None = None  # why it did not finish (with request, or alone if never added)
    is_internal: bool = False  # the error is the server's fault (HTTP 500), not the request's
    is_shutdown: bool = False  # ended because the server is shutting down (HTTP 503)

    @property
    def is_final(self) -> bool:
        return self.request is not None or self.error is not None

    def is_empty(self) -> bool:
        return not (self.path_tokens or self.path_finish or self.summary_tokens
                    or self.summary_finish or self.is_final)


class _StopWatch:
    """A sample's summary text after its template, decoded as it grows, checked for stops."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...], template_len: int) -> None:
        self.stop, self.longest = stop, max(len(s) for s in stop)
        self.detok = IncrementalDetokenizer(tokenizer)
        self.text, self.num_fed = "", max(0, template_len - 1)  # ids after <summary>

    def is_hit(self, req: Any) -> bool:
        if req.summary is None:
            return False
        ids = summary_text_ids(req.summary.tokens, req.summary_finish)
        if len(ids) <= self.num_fed:
            return False
        before = len(self.text)
        self.text += self.detok.add(ids[self.num_fed:])
        self.num_fed = len(ids)
        return first_stop(self.text, self.stop, max(0, before - self.longest + 1)) is not None


class SampleStream:
    """One sample of a request (a `Request`): how much of it has been handed out, and its stop
    strings (tokenizer and template_len, the summary template's length in tokens, for those)."""

    def __init__(self, num_paths: int, stop: tuple[str, ...] = (), tokenizer: Any = None,
                 template_len: int = 0) -> None:
        if stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self.num_path_sent = [0] * num_paths
        self.is_finish_sent = [False] * num_paths
        self.num_summary_sent = 0
        self.watch = _StopWatch(tokenizer, stop, template_len) if stop else None

    def is_stop_hit(self, req: Any) -> bool:
        """Whether the summary's generated text now holds a stop string (so far unseen)."""
        return self.watch is not None and req.status != "finished" and self.watch.is_hit(req)

    def delta(self, index: int, req: Any) -> Delta:
        """What sample `index` (`req`) gained since the last call."""
        d = Delta(index)
        for k, path in enumerate(req.paths):
            if len(path.tokens) > self.num_path_sent[k]:
                d.path_tokens[k] = path.tokens[self.num_path_sent[k]:]
                self.num_path_sent[k] = len(path.tokens)
            reason = req.path_finish[k]
            if reason is not None and not self.is_finish_sent[k]:
                d.path_finish[k] = reason
                self.is_finish_sent[k] = True
        if req.summary is not None and len(req.summary.tokens) > self.num_summary_sent:
            d.summary_tokens = req.summary.tokens[self.num_summary_sent:]
            self.num_summary_sent = len(req.summary.tokens)
        if req.status == "finished":
            d.summary_finish = req.summary_finish
        return d
