"""Engine Deltas -> the text of streamed chunks.

Two views of the paths, both detokenized incrementally, their text ids chosen by the same rules
as the whole outputs' (`spec.reference_layout.PathTextIds`, `engine.outputs.SummaryTextIds`, fed
step by step):
- the readable stream, in `reasoning_content` and `reasoning`: the non-streamed
  reasoning_content ("<think1>…</think1>\\n<think2>…</think2>") sent in order. Path 1 goes out
  as it is generated; path k's text is held back until paths 1..k-1 have closed, then sent at
  once and live from there. What a generic client (LiteLLM, LangChain) concatenates is the
  non-streamed text, character for character.
- live per-path deltas, only with stream_options.include_paths: {"path_index": k,
  "path_content": text}, and {"path_index": k, "path_finish_reason": …, "path_confidence": …,
  "path_answer": …} when path k closes (its confidence, null unless the request set
  confidence_window; its answer, the last \\boxed{} of its whole text, as the non-streamed path
  object's, left out with include_reasoning false).
The summary's text goes through the request's stop strings (`choices.StopFilter`): nothing at or
past one is sent, so the concatenated content is the non-streamed content. With `echo` the
prompt's text is the first text of the choice.
"""

from __future__ import annotations

from typing import Any

from parathinker.serve import responses as P
from parathinker.serve.choices import StopFilter
from parathinker.engine.detokenize import IncrementalDetokenizer
from parathinker.engine.outputs import SummaryTextIds
from parathinker.serve.engine_loop import Delta
from parathinker.spec.reference_layout import PathTextIds
from parathinker.spec.tokens import ControlTokens, last_boxed


class StreamText:
    def __init__(self, tokenizer: Any, ctrl: ControlTokens, num_paths: int,
                 include_reasoning: bool = True, include_paths: bool = False, index: int = 0,
                 stop: tuple[str, ...] = (), template_text: str = "", echo: str = "") -> None:
        self.ctrl, self.index, self.echo = ctrl, index, echo
        self.stop = StopFilter(stop, len(template_text))
        self.include_reasoning, self.include_paths = include_reasoning, include_paths
        self.paths = [IncrementalDetokenizer(tokenizer) for _ in range(num_paths)]
        self.path_ids = [PathTextIds(ctrl.think_close[k]) for k in range(num_paths)]
        self.held = [""] * num_paths  # path text not yet in the readable stream
        self.text = [""] * num_paths  # each path's whole text so far (its answer at its close)
        self.is_closed = [False] * num_paths
        self.current, self.is_open = 0, False  # the path the readable stream is in
        self.summary = IncrementalDetokenizer(tokenizer)
        self.summary_ids = SummaryTextIds()

    def choices(self, kind: str, d: Delta) -> list[dict[str, Any]]:
        out = []
        if self.echo:
            out.append(P.stream_choice(kind, index=self.index, content=self.echo))
            self.echo = ""
        for k in sorted(set(d.path_tokens) | set(d.path_finish)):
            text, reason = self._path_text(k, d)
            self.held[k] += text
            self.text[k] += text
            self.is_closed[k] = self.is_closed[k] or reason is not None
            if self.include_paths and text and self.include_reasoning:
                out.append(P.stream_choice(kind, index=self.index, path_index=k + 1,
                                           path_content=text))
            if self.include_paths and reason is not None:
                answer = last_boxed(self.text[k]) if self.include_reasoning else None
                out.append(P.stream_choice(kind, index=self.index, path_index=k + 1,
                                           path_finish=reason,
                                           path_confidence=d.path_confidence.get(k),
                                           path_answer=answer,
                                           with_answer=self.include_reasoning))
        readable = self._readable()
        if readable and self.include_reasoning:
            out.append(P.stream_choice(kind, index=self.index, reasoning=readable))
        text = self._summary_text(d)
        if text:
            out.append(P.stream_choice(kind, index=self.index, content=text))
        return out

    def _path_text(self, k: int, d: Delta) -> tuple[str, str | None]:
        """Path k's new text (`PathTextIds`: nothing of its tags or after its end tag), and its
        finish reason if it closed in this step."""
        ids = self.path_ids[k].add(d.path_tokens.get(k, []))
        reason = d.path_finish.get(k)
        done = reason is not None or self.path_ids[k].is_ended
        return self.paths[k].add(ids) + (self.paths[k].flush() if done else ""), reason

    def _readable(self) -> str:
        text = ""
        while self.current < len(self.paths):
            k = self.current
            if not self.is_open:
                text += ("\n" if k else "") + f"<think{k + 1}>"
                self.is_open = True
            text, self.held[k] = text + self.held[k], ""
            if not self.is_closed[k]:
                break
            text += f"</think{k + 1}>"
            self.current, self.is_open = k + 1, False
        return text

    def _summary_text(self, d: Delta) -> str:
        ids = self.summary_ids.add(d.summary_tokens, d.summary_finish)
        final = d.summary_finish is not None or d.is_final
        text = self.summary.add(ids) + (self.summary.flush() if final else "")
        return self.stop.add(text, final=final)
