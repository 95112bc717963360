"""One choice's final content: stop strings, echo, and OpenAI's logprobs shapes.

Stop strings apply to the summary's generated text only, never to its forced template (the
first `len(template_text)` characters of the summary text) nor to the paths: the returned text
ends right before the earliest occurrence of any of them, and the choice finishes with "stop".
The engine loop ends a sample after the token that completed a stop string (as vLLM checks
token by token), so "earliest" is among the stops in the text up to that token.
`StopFilter` does the same incrementally for streams, holding back text that could be the start
of a stop string.

Logprobs cover the tokens of the returned text, the summary's forced template included (scored
like sampled tokens: its own logprob under the summary's distribution at that position and the
top alternatives there; a forced token without an entry has logprob 0 and itself on top); the
summary's end token (</summary> or EOS) and tokens past a stop string are left out. -inf (a
token the masks or filters ruled out) is reported as -9999.0, as vLLM does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from parathinker.engine.confidence import LOGPROB_FLOOR
from parathinker.engine.detokenize import IncrementalDetokenizer, token_bytes
from parathinker.engine.outputs import RequestOutput, first_stop, summary_text_ids
from parathinker.serve.responses import finish_reason
from parathinker.spec.reference_layout import path_text_ids
from parathinker.spec.tokens import last_boxed


@dataclass
class Final:
    """What a finished sample answers: the summary text after stop strings, its finish reason
    and its answer (the last \\boxed{} of that text)."""

    text: str
    finish_reason: str
    answer: str | None


def finish(out: RequestOutput, stop: tuple[str, ...], template_text: str) -> Final:
    text, reason = out.summary.text, finish_reason(out.summary.finish_reason)
    start = len(template_text) if text.startswith(template_text) else 0
    cut = first_stop(text, stop, start)
    if cut is not None:
        text, reason = text[:cut], "stop"
    answer = out.answer if cut is None else last_boxed(text)
    return Final(text, reason, answer)


class StopFilter:
    """Streamed summary text in, the text to send out: the first `skip` characters (the
    template) pass as they are; then nothing at or past a stop string, and a tail that could
    start one is held until it cannot (or the stream ends)."""

    def __init__(self, stop: tuple[str, ...], skip: int) -> None:
        self.stop, self.skip = stop, skip
        self.pending = ""
        self.is_stopped = False

    def add(self, text: str, final: bool = False) -> str:
        if self.is_stopped:
            return ""
        out = text[: self.skip]
        self.skip -= len(out)
        self.pending += text[len(out):]
        if not self.stop:
            out, self.pending = out + self.pending, ""
            return out
        cut = first_stop(self.pending, self.stop)
        if cut is not None:
            out += self.pending[:cut]
            self.pending, self.is_stopped = "", True
            return out
        keep = 0 if final else _held(self.pending, self.stop)
        out += self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out


def _held(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is a proper start of some stop string."""
    for n in range(min(len(text), max(len(s) for s in stop) - 1), 0, -1):
        tail = text[-n:]
        if any(s.startswith(tail) and len(s) > n for s in stop):
            return n
    return 0


# ----- logprobs
def _finite(x: float) -> float:
    return x if math.isfinite(x) else LOGPROB_FLOOR


def _entries(tokenizer: Any, ids: list[int], logprobs: list[Any], num_chars: int | None = None
             ) -> list[tuple[int, bytes, float, list[tuple[int, bytes, float]]]]:
    """(id, bytes, logprob, top alternatives) per token, up to the token that completes
    `num_chars` characters of their decoded text (None: every token); a forced token (no
    entry) has logprob 0 and itself on top."""
    pieces = token_bytes(tokenizer, ids)
    detok = IncrementalDetokenizer(tokenizer)
    out, seen = [], 0
    for token, piece, entry in zip(ids, pieces, logprobs):
        if num_chars is not None and seen >= num_chars:
            break
        seen += len(detok.add([token]))
        lp, top_ids, top_lps = entry if entry is not None else (0.0, [token], [0.0])
        top_pieces = token_bytes(tokenizer, top_ids)
        out.append((token, piece, _finite(lp),
                    [(t, b, _finite(x)) for t, b, x in zip(top_ids, top_pieces, top_lps)]))
    return out


def _summary_entries(tokenizer: Any, out: RequestOutput, final: Final, k: int):
    """The tokens of the returned text (`summary_text_ids`), up to the stop string."""
    ids = summary_text_ids(out.summary.token_ids, out.summary.finish_reason)
    lps = (out.summary.logprobs or [None] * len(out.summary.token_ids))[1:][:len(ids)]
    cut = len(final.text) if len(final.text) < len(out.summary.text) else None
    entries = _entries(tokenizer, ids, lps, cut)
    return [(t, b, lp, top[:k]) for t, b, lp, top in entries]


def _text(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


def chat_logprobs(entries: list) -> dict[str, Any]:
    """OpenAI chat shape: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
    return {"content": [
        {"token": _text(b), "logprob": lp, "bytes": list(b),
         "top_logprobs": [{"token": _text(tb), "logprob": tlp, "bytes": list(tb)}
                          for _, tb, tlp in top]}
        for _, b, lp, top in entries], "refusal": None}


def completion_logprobs(entries: list, offset: int = 0) -> dict[str, Any]:
    """OpenAI completions shape: tokens, token_logprobs, top_logprobs (the k best and the
    chosen token, by token text), text_offset (characters into the returned text)."""
    tokens, text_offset, joined = [], [], b""
    for _, b, _, _ in entries:
        text_offset.append(offset + len(joined.decode("utf-8", errors="ignore")))
        joined += b
        tokens.append(_text(b))
    tops = []
    for _, b, lp, top in entries:
        d = {_text(tb): tlp for _, tb, tlp in top}
        d.setdefault(_text(b), lp)
        tops.append(d)
    return {"tokens": tokens, "token_logprobs": [e[2] for e in entries], "top_logprobs": tops,
            "text_offset": text_offset}


def summary_logprobs(tokenizer: Any, out: RequestOutput, final: Final, k: int, kind: str,
                     offset: int = 0) -> dict[str, Any]:
    entries = _summary_entries(tokenizer, out, final, k)
    return chat_logprobs(entries) if kind == "chat" else completion_logprobs(entries, offset)


def path_logprobs(tokenizer: Any, out: RequestOutput, close_ids: list[int], k: int
                  ) -> list[dict[str, Any]]:
    """Per path, the chat shape over its text's tokens (after <think{k}>, before its end tag)."""
    result = []
    for p in out.paths:
        ids = path_text_ids(p.token_ids, close_ids[p.index - 1])
        lps = (p.logprobs or [None] * len(p.token_ids))[1: 1 + len(ids)]
        entries = _entries(tokenizer, ids, lps)
        result.append(chat_logprobs([(t, b, lp, top[:k]) for t, b, lp, top in entries]))
    return result
