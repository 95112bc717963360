"""The OpenAI wire format: request parsing and validation, prompts, response and chunk bodies.

Requests are validated by hand (clear messages, exact types: a bool is not an int, the field at
fault named in `param`) into a `ParsedRequest`; `sampling_params` turns it into SamplingParams
with the server's defaults, and the app then calls `llm.validate`, so a bad request gets the
Python API's own message (`param_of` names the request field it came from).

Extension fields (all optional; a plain OpenAI request uses the server's defaults):
- request: "parallel": {"num_paths", "max_path_tokens", "min_path_tokens",
  "max_summary_tokens", "min_finished_paths"} (the SamplingParams fields, summary template
  included in max_summary_tokens); "top_k" at the top level (as vLLM);
  "include_reasoning" (default true); "stream_options": {"include_usage", "include_paths"}.
- `max_completion_tokens` (else `max_tokens`) caps what is generated: path tokens plus the
  summary after its template, so usage.completion_tokens never exceeds it (`fit_to_cap`).
- evaluation-harness fields (docs/SERVE.md has the table of every field): `n` (samples sharing
  the prompt), `stop` (on the summary's generated text; choices.py), `logprobs`/`top_logprobs`
  (chat) and `logprobs: k` (completions), extension `path_logprobs`, `echo`, and a batch of
  prompts on /v1/completions; loglikelihood requests (echo + logprobs, max_tokens 0) are refused
  with the reason (`LOGLIKELIHOOD`).
- response: message.reasoning_content and .reasoning (every path as "<think{k}>text</think{k}>",
  one per line), message.paths ([{index, text, finish_reason: end|budget|cut, num_tokens}]),
  message.answer (the summary's last \\boxed{}), usage.path_tokens / summary_tokens and
  usage.completion_tokens_details.reasoning_tokens (= path tokens).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from parathinker.config import SamplingParams
from parathinker.engine.outputs import RequestOutput

PARALLEL_KEYS = ("num_paths", "max_path_tokens", "min_path_tokens", "max_summary_tokens",
                 "min_finished_paths")
FINISH_REASONS = {"end": "stop", "budget": "length"}  # summary finish -> OpenAI finish_reason
GREEDY_BELOW = 1e-5  # a smaller positive temperature is greedy (dividing by it overflows float32)
SEED_RANGE = (-(1 << 63), (1 << 63) - 1)  # int64, as vLLM
DEEPSEEK_USER, DEEPSEEK_ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
# SamplingParams fields in the order their names are looked for at the start of an error message
_FIELDS = ("min_finished_paths", "max_summary_tokens", "max_path_tokens", "min_path_tokens",
           "num_paths", "temperature", "top_p", "top_k", "seed")

# The server's defaults are a SamplingParams: what a request gets for every field it leaves out
# (`parathinker serve` flags; seed None). Kept under this name for readers of the server code.
ServeDefaults = SamplingParams


class APIError(Exception):
    """An error answered as OpenAI's {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


@dataclass
class ParsedRequest:
    model: str | None
    stream: bool
    settings: dict[str, Any] = field(default_factory=dict)  # explicit SamplingParams fields
    sources: dict[str, str] = field(default_factory=dict)  # SamplingParams field -> request field
    cap: int | None = None  # max_completion_tokens (or max_tokens): paths + generated summary
    cap_param: str | None = None  # which of the two set `cap`
    include_usage: bool = False  # stream_options.include_usage: the last chunk carries usage
    include_paths: bool = False  # stream_options.include_paths: live per-path deltas too
    include_reasoning: bool = True
    prompt_param: str = "messages"  # where the prompt came from, for errors about it
    messages: list[dict[str, str]] | None = None  # chat: [{role, content}] with text content
    prompts: list[str | list[int]] = field(default_factory=list)  # completions: text or ids
    n: int = 1  # samples per prompt
    stop: tuple[str, ...] = ()  # stop strings, applied to the summary's generated text
    logprobs: int | None = None  # top alternatives per summary token (None: no logprobs)
    path_logprobs: bool = False  # the paths' tokens too (extension)
    echo: bool = False  # completions: the prompt's text before each choice's text

    @property
    def num_text_bytes(self) -> int:
        """UTF-8 size of the text to tokenize (a cheap bound on the work before tokenizing)."""
        texts = [m["content"] for m in self.messages or []] + [
            p for p in self.prompts if isinstance(p, str)]
        return sum(len(t.encode("utf-8")) for t in texts)


# ----- the body
def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 (malformed, NaN/Infinity, nested too deep)."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise APIError(400, "request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    return body


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a valid JSON number")


# ----- typed field access
def _bad(param: str, message: str) -> APIError:
    return APIError(400, message, param=param)


def _get(body: dict[str, Any], name: str, types: tuple[type, ...], what: str,
         prefix: str = "") -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise _bad(prefix + name, f"'{prefix}{name}' must be {what}, got {type(value).__name__} "
                                  f"{_short(value)}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(body: dict[str, Any], name: str, prefix: str = "") -> int | None:
    return _get(body, name, (int,), "an integer", prefix)


def _bool(body: dict[str, Any], name: str, prefix: str = "") -> bool | None:
    return _get(body, name, (bool,), "a boolean", prefix)


def _number(body: dict[str, Any], name: str) -> float | None:
    value = _get(body, name, (int, float), "a number")
    if value is not None and not math.isfinite(value):
        raise _bad(name, f"'{name}' must be a finite number")
    return None if value is None else float(value)


def _text(value: str, param: str) -> str:
    """JSON may carry a lone surrogate ("\\ud800"), which no tokenizer (nor UTF-8) can take."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(param, f"'{param}' contains a lone surrogate (not valid Unicode)") from None
    return value


MAX_N = 16  # samples per prompt
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_CHOICES = 128  # prompts x n
MAX_STOP = 4  # as OpenAI
MAX_LOGPROBS = 20  # top alternatives per token (chat top_logprobs, completions logprobs)
LOGLIKELIHOOD = ("loglikelihood scoring (lm-eval's loglikelihood / multiple-choice tasks send "
                 "'echo' with 'logprobs', and 'max_tokens': 0) is not supported: it asks for the "
                 "prompt's own token logprobs, but a ParaThinker answer is a summary written after "
                 "P reasoning paths, not a continuation of the prompt, so such scores would "
                 "measure the bare prompt and bypass parallel thinking; use generate_until tasks")


def _reject_unsupported(body: dict[str, Any]) -> None:
    """Standard fields this server cannot honor: a clear 400 instead of silently ignoring them."""
    for name in ("suffix", "logit_bias", "tools", "functions"):
        if body.get(name):
            raise _bad(name, f"'{name}' is not supported by this server")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name):
            raise _bad(name, f"'{name}' is not supported by this server (only 0)")
    if _int(body, "best_of") not in (None, 1):
        raise _bad("best_of", "'best_of' must be 1 (use 'n' for several samples)")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise _bad("response_format", "only response_format {'type': 'text'} is supported")


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise _bad("stop", f"'stop' must be a string or a list of strings, got {_short(stop)}")
    if len(items) > MAX_STOP:
        raise _bad("stop", f"'stop' holds at most {MAX_STOP} strings, got {len(items)}")
    if any(not s for s in items):
        raise _bad("stop", "'stop' strings must not be empty")
    return tuple(_text(s, "stop") for s in items)


def _logprobs(body: dict[str, Any], kind: str, parsed: ParsedRequest) -> None:
    """Chat: logprobs (bool) + top_logprobs (0..20); completions: logprobs (0..20)."""
    if kind == "chat":
        wanted = _bool(body, "logprobs")
        top = _int(body, "top_logprobs")
        if top is not None and not 0 <= top <= MAX_LOGPROBS:
            raise _bad("top_logprobs", f"'top_logprobs' must be in 0..{MAX_LOGPROBS}, got {top}")
        if top and not wanted:
            raise _bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
        if body.get("echo"):
            raise _bad("echo", "'echo' is a /v1/completions field")
        parsed.logprobs = (top or 0) if wanted else None
    else:
        if body.get("top_logprobs") not in (None, 0):
            raise _bad("top_logprobs", "'top_logprobs' is a chat field; /v1/completions takes "
                                       "'logprobs': k")
        k = None if body.get("logprobs") is False else _int(body, "logprobs")
        if k is not None and not 0 <= k <= MAX_LOGPROBS:
            raise _bad("logprobs", f"'logprobs' must be in 0..{MAX_LOGPROBS}, got {k}")
        parsed.logprobs = k
        parsed.echo = _bool(body, "echo") or False
        if parsed.echo and k is not None:
            raise _bad("echo", LOGLIKELIHOOD)
    parsed.path_logprobs = _bool(body, "path_logprobs") or False
    if parsed.path_logprobs and parsed.logprobs is None:
        raise _bad("path_logprobs", "'path_logprobs' needs logprobs ('logprobs': true on chat, "
                                    "'logprobs': k on completions)")
    if parsed.logprobs is not None and parsed.stream:
        raise _bad("logprobs", "logprobs are returned in non-streaming responses only")


def _common(body: dict[str, Any], kind: str) -> ParsedRequest:
    _reject_unsupported(body)
    model = _get(body, "model", (str,), "a string")
    stream = _bool(body, "stream") or False
    parsed = ParsedRequest(model, stream)
    n = _int(body, "n")
    if n is not None and not 1 <= n <= MAX_N:
        raise _bad("n", f"'n' must be in 1..{MAX_N}, got {n}")
    parsed.n = n or 1
    parsed.stop = _stop(body)
    _logprobs(body, kind, parsed)
    options = _get(body, "stream_options", (dict,), "an object")
    if options is not None:
        if not stream:
            raise _bad("stream_options", "'stream_options' is only allowed with 'stream': true")
        parsed.include_usage = _bool(options, "include_usage", "stream_options.") or False
        parsed.include_paths = _bool(options, "include_paths", "stream_options.") or False
    include = _bool(body, "include_reasoning")
    parsed.include_reasoning = True if include is None else include
    if parsed.path_logprobs and not parsed.include_reasoning:
        raise _bad("path_logprobs", "'path_logprobs' shows the paths' tokens, which "
                                    "'include_reasoning': false leaves out")
    settings, sources = parsed.settings, parsed.sources
    for name in ("temperature", "top_p"):
        if (v := _number(body, name)) is not None:
            settings[name], sources[name] = v, name
    if 0 < settings.get("temperature", 1.0) < GREEDY_BELOW:
        settings["temperature"] = 0.0  # (a negative one is left to SamplingParams' message)
    for name in ("top_k", "seed"):
        if (v := _int(body, name)) is not None:
            settings[name], sources[name] = v, name
    if "seed" in settings and not SEED_RANGE[0] <= settings["seed"] <= SEED_RANGE[1]:
        raise _bad("seed", f"'seed' must be in {SEED_RANGE[0]}..{SEED_RANGE[1]} (int64)")
    for name in ("max_tokens", "max_completion_tokens"):  # the second wins, as in vLLM
        if (v := _int(body, name)) is not None:
            parsed.cap, parsed.cap_param = v, name
    if parsed.cap == 0:
        raise _bad(parsed.cap_param or "", f"'{parsed.cap_param}': 0 generates nothing; "
                                           + LOGLIKELIHOOD)
    if parsed.cap is not None and parsed.cap < 1:
        raise _bad(parsed.cap_param or "", f"'{parsed.cap_param}' must be >= 1, got {parsed.cap}")
    parallel = _get(body, "parallel", (dict,), "an object")
    if parallel is not None:
        unknown = sorted(set(parallel) - set(PARALLEL_KEYS))
        if unknown:
            raise _bad("parallel", f"unknown key(s) {unknown} in 'parallel'; known: "
                                   f"{list(PARALLEL_KEYS)}")
        for name in PARALLEL_KEYS:
            if (v := _int(parallel, name, "parallel.")) is not None:
                settings[name], sources[name] = v, f"parallel.{name}"
    return parsed


def _text_content(content: Any, i: int) -> str:
    param = f"messages[{i}].content"
    if isinstance(content, str):
        return _text(content, param)
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise _bad(param, "only text content parts ({'type': 'text', 'text': ...}) are "
                                  "supported")
            parts.append(_text(part["text"], param))
        return "\n".join(parts)
    raise _bad(param, "message content must be a string or a list of text parts")


def parse_chat(body: dict[str, Any]) -> ParsedRequest:
    parsed = _common(body, "chat")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "'messages' must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", "each message must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise _bad(f"messages[{i}].role", f"unsupported role {_short(role)}; use system, "
                                              "developer, user or assistant")
        out.append({"role": "system" if role == "developer" else role,
                    "content": _text_content(m.get("content"), i)})
    if out[-1]["role"] != "user":
        raise _bad("messages", "the last message must be the user's question")
    parsed.messages = out
    return parsed


def parse_completion(body: dict[str, Any]) -> ParsedRequest:
    """`prompt`: a string, a list of token ids, or a batch: a list of strings or of token-id
    lists (one choice per prompt, times n, in order)."""
    parsed = _common(body, "completion")
    parsed.prompt_param = "prompt"
    prompt = body.get("prompt")
    if isinstance(prompt, str) or _is_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_ids(p)
                                                     for p in prompt):
        prompts = prompt
    else:
        raise _bad("prompt", "'prompt' must be a string, a list of token ids, or a non-empty "
                             "list of those (a batch)")
    if len(prompts) > MAX_PROMPTS:
        raise _bad("prompt", f"a batch holds at most {MAX_PROMPTS} prompts, got {len(prompts)}")
    if len(prompts) * parsed.n > MAX_CHOICES:
        raise _bad("n", f"{len(prompts)} prompts x n={parsed.n} is more than {MAX_CHOICES} "
                        "choices; split the batch")
    parsed.prompts = [_text(p, "prompt") if isinstance(p, str) else list(p) for p in prompts]
    return parsed


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)


# ----- prompts
def chat_prompt(messages: list[dict[str, str]], format_prompt: Any) -> str:
    """The ParaThinker prompt for a conversation: the last user message goes through the model's
    prompt template (SPEC §3, `llm.format_prompt`); system messages come first; earlier turns
    precede it in the DeepSeek-R1 chat format that template belongs to."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    history = []
    for m in messages[:-1]:
        if m["role"] == "user":
            history.append(DEEPSEEK_USER + m["content"])
        elif m["role"] == "assistant":
            history.append(DEEPSEEK_ASSISTANT + m["content"] + "<｜end▁of▁sentence｜>")
    return system + "".join(history) + format_prompt(messages[-1]["content"])


# ----- sampling parameters
def sampling_params(parsed: ParsedRequest, defaults: SamplingParams, prompt_len: int,
                    context: int, template_len: int, path_multiple: int = 1) -> SamplingParams:
    """Explicit settings over the defaults. A default that the request did not set is fitted to
    the request: min_finished_paths <= num_paths, the budgets to the client's cap (`fit_to_cap`),
    min_path_tokens <= max_path_tokens, and max_path_tokens to what the context leaves after the
    prompt and the summary, rounded down to a multiple of `path_multiple` (16 for the reference
    layout, SPEC §6)."""
    s = dict(parsed.settings)
    s.setdefault("num_paths", defaults.num_paths)
    s.setdefault("min_finished_paths", min(defaults.min_finished_paths, max(s["num_paths"], 1)))
    if parsed.cap is not None:
        fit_to_cap(s, parsed, defaults, template_len, path_multiple)
    s.setdefault("max_summary_tokens", defaults.max_summary_tokens)
    if "max_path_tokens" not in s:
        room = context - prompt_len - s["max_summary_tokens"]
        s["max_path_tokens"] = _round_down(min(defaults.max_path_tokens, room), path_multiple) \
            if room >= 2 else defaults.max_path_tokens
    s.setdefault("min_path_tokens", min(defaults.min_path_tokens, s["max_path_tokens"]))
    for name in ("temperature", "top_p", "top_k"):
        s.setdefault(name, getattr(defaults, name))
    try:
        return SamplingParams(**s)
    except ValueError as e:
        raise APIError(400, str(e), param=param_of(str(e), parsed)) from None


def _round_down(n: int, multiple: int) -> int:
    return n if multiple <= 1 else max(multiple, n // multiple * multiple)


def fit_to_cap(s: dict[str, Any], parsed: ParsedRequest, defaults: SamplingParams,
               template_len: int, path_multiple: int = 1) -> None:
    """The client's cap C bounds every generated token: P paths of max_path_tokens (tags
    included) plus the summary after its forced template. Budgets the request left out split C:
    each path gets min(default, max(2, C // (P + 1))), the summary what is left (up to its
    default); budgets it set must fit within C."""
    cap, param = parsed.cap, parsed.cap_param or "max_tokens"
    assert cap is not None
    num_paths = max(1, s["num_paths"])
    if "max_path_tokens" not in s:
        s["max_path_tokens"] = _round_down(
            min(defaults.max_path_tokens, max(2, cap // (num_paths + 1))), path_multiple)
        parsed.sources["max_path_tokens"] = param
    if "max_summary_tokens" not in s:
        left = cap - num_paths * s["max_path_tokens"]
        s["max_summary_tokens"] = template_len + min(defaults.max_summary_tokens - template_len,
                                                     left)
        parsed.sources["max_summary_tokens"] = param
    generated = num_paths * s["max_path_tokens"] + s["max_summary_tokens"] - template_len
    if generated > cap or s["max_summary_tokens"] <= template_len:
        raise _bad(param, f"'{param}'={cap} cannot hold {num_paths} path(s) of max_path_tokens="
                          f"{s['max_path_tokens']} (tags included) and a summary of at least one "
                          f"token after its template: use at least "
                          f"{num_paths * min(s['max_path_tokens'], 2) + 1}, fewer paths or "
                          "smaller parallel budgets")


def param_of(message: str, parsed: ParsedRequest) -> str | None:
    """The request field a SamplingParams / llm.validate message is about."""
    for name in _FIELDS:
        if message.startswith(name):
            return parsed.sources.get(name, f"parallel.{name}" if name in PARALLEL_KEYS else name)
    if message.startswith("prompt (") and "max_path_tokens" in parsed.sources:
        return parsed.sources["max_path_tokens"]  # prompt + budgets beyond the context
    if message.startswith(("prompt", "empty prompt")):
        return parsed.prompt_param
    return None


# ----- responses
def finish_reason(summary_finish: str) -> str:
    return FINISH_REASONS.get(summary_finish, summary_finish)


def reasoning_text(out: RequestOutput) -> str:
    return "\n".join(f"<think{p.index}>{p.text}</think{p.index}>" for p in out.paths)


def path_list(out: RequestOutput, with_text: bool = True) -> list[dict[str, Any]]:
    return [{"index": p.index, **({"text": p.text} if with_text else {}),
             "finish_reason": p.finish_reason, "num_tokens": len(p.token_ids)} for p in out.paths]


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
                  path_finish: str | None = None, role: bool = False, finish: str | None = None,
                  paths: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One choice of a chunk. Chat puts text in `delta`; completions in the choice itself.
    `reasoning` is the readable stream (reasoning_content and reasoning); `path_*` one path's
    live delta (the include_paths extension)."""
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
    if kind == "chat":
        choice: dict[str, Any] = {"index": index, "delta": fields, "logprobs": None,
                                  "finish_reason": finish}
    else:
        choice = {"index": index, "text": "", "logprobs": None, "finish_reason": finish,
                  **fields}
    if paths is not None:
        choice["paths"] = paths
    return choice
