"""OpenAI response bodies: choices, usage, whole responses and stream chunks.

ParaThinker's extension fields, beside the standard ones: message.reasoning_content and
.reasoning (every path as "<think{k}>text</think{k}>", one per line), message.paths ([{index,
text, finish_reason: end|budget|cut|pruned, num_tokens, confidence, answer}]: confidence the
path's lowest group confidence, null unless the request set confidence_window; answer the path's
last \\boxed{}), message.answer (the summary's last \\boxed{}), usage.path_tokens / summary_tokens and usage.completion_tokens_details.reasoning_tokens
(= path tokens). Streams: a chunk per choice (`stream_choice`); docs/SERVE.md shows both.
"""

from __future__ import annotations

from typing import Any

from parathinker.engine.outputs import RequestOutput

FINISH_REASONS = {"end": "stop", "budget": "length"}  # summary finish -> OpenAI finish_reason


def finish_reason(summary_finish: str) -> str:
    return FINISH_REASONS.get(summary_finish, summary_finish)


def reasoning_text(out: RequestOutput) -> str:
    return "\n".join(f"<think{p.index}>{p.text}</think{p.index}>" for p in out.paths)


def path_list(out: RequestOutput, with_text: bool = True, with_answer: bool | None = None
              ) -> list[dict[str, Any]]:
    """The `paths` objects. `with_answer` (default: `with_text`) adds each path's answer, a piece
    of its text: left out with include_reasoning false; a stream's finish chunk, whose text was
    streamed, has it without the text."""
    with_answer = with_text if with_answer is None else with_answer
    return [{"index": p.index, **({"text": p.text} if with_text else {}),
             "finish_reason": p.finish_reason, "num_tokens": len(p.token_ids),
             "confidence": p.confidence, **({"answer": p.answer} if with_answer else {})}
            for p in out.paths]


def usage(outs: list[RequestOutput], template_len: int,
          prompt_tokens: int | None = None) -> dict[str, Any]:
    """Summed over every choice. completion_tokens counts what was generated: every path token
    (tags included) and the summary after its forced template. prompt_tokens: each prompt once
    however many samples it had (default: the prompt of each output)."""
    if prompt_tokens is None:
        prompt_tokens = sum(len(o.prompt_token_ids) for o in outs)
    paths = sum(o.num_path_tokens for o in outs)
    summary = sum(max(0, len(o.summary.token_ids) - template_len) for o in outs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": paths + summary,
            "total_tokens": prompt_tokens + paths + summary, "path_tokens": paths,
            "summary_tokens": summary, "completion_tokens_details": {"reasoning_tokens": paths}}


def _reasoning_fields(out: RequestOutput, include_reasoning: bool) -> dict[str, Any]:
    if not include_reasoning:
        return {"paths": path_list(out, with_text=False)}
    text = reasoning_text(out)
    return {"reasoning_content": text, "reasoning": text, "paths": path_list(out)}


def chat_choice(index: int, out: RequestOutput, final: Any, include_reasoning: bool = True,
                logprobs: dict[str, Any] | None = None,
                path_logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """`final`: choices.Final (the text after stop strings, finish reason, answer)."""
    message = {"role": "assistant", "content": final.text,
               **_reasoning_fields(out, include_reasoning), "answer": final.answer}
    _add_path_logprobs(message["paths"], path_logprobs)
    return {"index": index, "message": message, "logprobs": logprobs,
            "finish_reason": final.finish_reason}


def completion_choice(index: int, out: RequestOutput, final: Any, include_reasoning: bool = True,
                      logprobs: dict[str, Any] | None = None,
                      path_logprobs: list[dict[str, Any]] | None = None,
                      echo: str = "") -> dict[str, Any]:
    choice = {"index": index, "text": echo + final.text, "logprobs": logprobs,
              "finish_reason": final.finish_reason, **_reasoning_fields(out, include_reasoning),
              "answer": final.answer}
    _add_path_logprobs(choice["paths"], path_logprobs)
    return choice


def _add_path_logprobs(paths: list[dict[str, Any]], logprobs: list[dict[str, Any]] | None
                       ) -> None:
    for p, lp in zip(paths, logprobs or []):
        p["logprobs"] = lp


def response(kind: str, rid: str, created: int, model: str, choices: list[dict[str, Any]],
             usage_: dict[str, Any]) -> dict[str, Any]:
    obj = "chat.completion" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": choices,
            "usage": usage_}


def chunk(kind: str, rid: str, created: int, model: str, choices: list[dict[str, Any]],
          usage_: dict[str, Any] | None = None) -> dict[str, Any]:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    body: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model,
                            "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def stream_choice(kind: str, *, index: int = 0, content: str | None = None,
                  reasoning: str | None = None,
                  path_index: int | None = None, path_content: str | None = None,
                  path_finish: str | None = None, path_confidence: float | None = None,
                  path_answer: str | None = None, with_answer: bool = True, role: bool = False,
                  finish: str | None = None, paths: list[dict[str, Any]] | None = None
                  ) -> dict[str, Any]:
    """One choice of a chunk. Chat puts text in `delta`; completions in the choice itself.
    `reasoning` is the readable stream (reasoning_content and reasoning); `path_*` one path's
    live delta (the include_paths extension): with `path_finish`, its confidence and (unless
    `with_answer` is false) its answer, null when it has none."""
    fields: dict[str, Any] = {}
    if role:
        fields["role"] = "assistant"
    if content is not None or role:
        fields["content" if kind == "chat" else "text"] = content or ""
    if reasoning is not None:
        fields["reasoning_content"] = fields["reasoning"] = reasoning
    if path_index is not None:
        fields["path_index"] = path_index
        fields["path_content"] = path_content or ""
    if path_finish is not None:
        fields["path_finish_reason"] = path_finish
        fields["path_confidence"] = path_confidence
        if with_answer:
            fields["path_answer"] = path_answer
    if kind == "chat":
        choice: dict[str, Any] = {"index": index, "delta": fields, "logprobs": None,
                                  "finish_reason": finish}
    else:
        choice = {"index": index, "text": "", "logprobs": None, "finish_reason": finish,
                  **fields}
    if paths is not None:
        choice["paths"] = paths
    return choice
