"""OpenAI request bodies -> `ParsedRequest`: parsing and validation of /v1/chat/completions and
/v1/completions, and the prompt of a conversation.

Requests are validated by hand (clear messages, exact types: fields.py) into a `ParsedRequest`;
params.py turns it into SamplingParams with the server's defaults, and the server then calls
`llm.validate`, so a bad request gets the Python API's own message (`params.param_of` names the
request field it came from).

Extension fields (all optional; a plain OpenAI request uses the server's defaults):
- request: "parallel": {"num_paths", "max_path_tokens", "min_path_tokens",
  "max_summary_tokens", "min_finished_paths", "confidence_window", "confidence_top_k",
  "prune_confidence", "stop_on_agreement"} (the SamplingParams fields, summary template
  included in max_summary_tokens; `PARALLEL_FIELDS` types them), each also accepted flat at the
  top level (vLLM's extra_body style; in both places with different values: 400); "top_k" at the top level (as vLLM);
  "include_reasoning" (default true); "stream_options": {"include_usage", "include_paths"}.
- `max_completion_tokens` (else `max_tokens`) caps what is generated: path tokens plus the
  summary after its template, so usage.completion_tokens never exceeds it (`params.fit_to_cap`;
  a cap below 3 runs the smallest request, 3 tokens).
- evaluation-harness fields (docs/SERVE.md has the table of every field): `n` (samples sharing
  the prompt), `stop` (on the summary's generated text; choices.py), `logprobs`/`top_logprobs`
  (chat) and `logprobs: k` (completions), extension `path_logprobs`, `echo`, and a batch of
  prompts on /v1/completions; loglikelihood requests (echo + logprobs, max_tokens 0) are refused
  with the reason (`LOGLIKELIHOOD`).
Other fields are ignored, as OpenAI clients expect, and each name is logged once per process.
The response fields (reasoning_content, paths, answer, usage): responses.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from parathinker.serve.fields import (bad, checked_text, get_bool, get_int, get_number,
                                      get_typed, log_ignored, short)

_GETTERS = {"integer": get_int, "number": get_number}

# the `parallel` object's fields (SamplingParams' names) and their JSON types: the one table the
# parser, the error params and /v1/models' card read
PARALLEL_FIELDS = {"num_paths": "integer", "max_path_tokens": "integer", "min_path_tokens": "integer",
                   "max_summary_tokens": "integer", "min_finished_paths": "integer",
                   "confidence_window": "integer", "confidence_top_k": "integer",
                   "prune_confidence": "number", "stop_on_agreement": "integer"}
PARALLEL_KEYS = tuple(PARALLEL_FIELDS)
KNOWN_FIELDS = frozenset((  # top-level fields read on both routes (besides messages / prompt)
    "model", "stream", "stream_options", "n", "stop", "logprobs", "top_logprobs", "echo",
    "path_logprobs", "include_reasoning", "temperature", "top_p", "top_k", "seed", "max_tokens",
    "max_completion_tokens", "parallel", "suffix", "logit_bias", "tools", "functions",
    "presence_penalty", "frequency_penalty", "best_of", "response_format", *PARALLEL_KEYS))
GREEDY_BELOW = 1e-5  # a smaller positive temperature is greedy (dividing by it overflows float32)
SEED_RANGE = (-(1 << 63), (1 << 63) - 1)  # int64, as vLLM
DEEPSEEK_USER, DEEPSEEK_ASSISTANT = "<｜User｜>", "<｜Assistant｜>"


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
            raise bad(name, f"'{name}' is not supported by this server")
    for name in ("presence_penalty", "frequency_penalty"):
        if get_number(body, name):
            raise bad(name, f"'{name}' is not supported by this server (only 0)")
    if get_int(body, "best_of") not in (None, 1):
        raise bad("best_of", "'best_of' must be 1 (use 'n' for several samples)")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise bad("response_format", "only response_format {'type': 'text'} is supported")


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise bad("stop", f"'stop' must be a string or a list of strings, got {short(stop)}")
    if len(items) > MAX_STOP:
        raise bad("stop", f"'stop' holds at most {MAX_STOP} strings, got {len(items)}")
    if any(not s for s in items):
        raise bad("stop", "'stop' strings must not be empty")
    return tuple(checked_text(s, "stop") for s in items)


def _logprobs(body: dict[str, Any], kind: str, parsed: ParsedRequest) -> None:
    """Chat: logprobs (bool) + top_logprobs (0..20); completions: logprobs (0..20)."""
    if kind == "chat":
        wanted = get_bool(body, "logprobs")
        top = get_int(body, "top_logprobs")
        if top is not None and not 0 <= top <= MAX_LOGPROBS:
            raise bad("top_logprobs", f"'top_logprobs' must be in 0..{MAX_LOGPROBS}, got {top}")
        if top and not wanted:
            raise bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
        if body.get("echo"):
            raise bad("echo", "'echo' is a /v1/completions field")
        parsed.logprobs = (top or 0) if wanted else None
    else:
        if body.get("top_logprobs") not in (None, 0):
            raise bad("top_logprobs", "'top_logprobs' is a chat field; /v1/completions takes "
                                       "'logprobs': k")
        k = None if body.get("logprobs") is False else get_int(body, "logprobs")
        if k is not None and not 0 <= k <= MAX_LOGPROBS:
            raise bad("logprobs", f"'logprobs' must be in 0..{MAX_LOGPROBS}, got {k}")
        parsed.logprobs = k
        parsed.echo = get_bool(body, "echo") or False
        if parsed.echo and k is not None:
            raise bad("echo", LOGLIKELIHOOD)
    parsed.path_logprobs = get_bool(body, "path_logprobs") or False
    if parsed.path_logprobs and parsed.logprobs is None:
        raise bad("path_logprobs", "'path_logprobs' needs logprobs ('logprobs': true on chat, "
                                    "'logprobs': k on completions)")
    if parsed.logprobs is not None and parsed.stream:
        raise bad("logprobs", "logprobs are returned in non-streaming responses only")


def _common(body: dict[str, Any], kind: str) -> ParsedRequest:
    _reject_unsupported(body)
    model = get_typed(body, "model", (str,), "a string")
    stream = get_bool(body, "stream") or False
    parsed = ParsedRequest(model, stream)
    n = get_int(body, "n")
    if n is not None and not 1 <= n <= MAX_N:
        raise bad("n", f"'n' must be in 1..{MAX_N}, got {n}")
    parsed.n = n or 1
    parsed.stop = _stop(body)
    _logprobs(body, kind, parsed)
    options = get_typed(body, "stream_options", (dict,), "an object")
    if options is not None:
        if not stream:
            raise bad("stream_options", "'stream_options' is only allowed with 'stream': true")
        parsed.include_usage = get_bool(options, "include_usage", "stream_options.") or False
        parsed.include_paths = get_bool(options, "include_paths", "stream_options.") or False
    include = get_bool(body, "include_reasoning")
    parsed.include_reasoning = True if include is None else include
    if parsed.path_logprobs and not parsed.include_reasoning:
        raise bad("path_logprobs", "'path_logprobs' shows the paths' tokens, which "
                                    "'include_reasoning': false leaves out")
    settings, sources = parsed.settings, parsed.sources
    for name in ("temperature", "top_p"):
        if (v := get_number(body, name)) is not None:
            settings[name], sources[name] = v, name
    if 0 < settings.get("temperature", 1.0) < GREEDY_BELOW:
        settings["temperature"] = 0.0  # (a negative one is left to SamplingParams' message)
    for name in ("top_k", "seed"):
        if (v := get_int(body, name)) is not None:
            settings[name], sources[name] = v, name
    if "seed" in settings and not SEED_RANGE[0] <= settings["seed"] <= SEED_RANGE[1]:
        raise bad("seed", f"'seed' must be in {SEED_RANGE[0]}..{SEED_RANGE[1]} (int64)")
    for name in ("max_tokens", "max_completion_tokens"):  # the second wins, as in vLLM
        if (v := get_int(body, name)) is not None:
            parsed.cap, parsed.cap_param = v, name
    if parsed.cap == 0:
        raise bad(parsed.cap_param or "", f"'{parsed.cap_param}': 0 generates nothing; "
                                           + LOGLIKELIHOOD)
    if parsed.cap is not None and parsed.cap < 1:
        raise bad(parsed.cap_param or "", f"'{parsed.cap_param}' must be >= 1, got {parsed.cap}")
    _parallel(body, parsed)
    log_ignored(body, KNOWN_FIELDS | ({"messages"} if kind == "chat" else {"prompt"}))
    return parsed


def _parallel(body: dict[str, Any], parsed: ParsedRequest) -> None:
    """The `parallel` object's fields, also accepted flat at the top level (vLLM's extra_body
    style); one field in both places must carry the same value."""
    parallel = get_typed(body, "parallel", (dict,), "an object") or {}
    unknown = sorted(set(parallel) - set(PARALLEL_KEYS))
    if unknown:
        raise bad("parallel", f"unknown key(s) {unknown} in 'parallel'; known: "
                               f"{list(PARALLEL_KEYS)}")
    for name, kind in PARALLEL_FIELDS.items():
        get = _GETTERS[kind]
        nested, flat = get(parallel, name, "parallel."), get(body, name)
        if nested is not None and flat is not None and nested != flat:
            raise bad(name, f"'{name}' is set both at the top level ({flat}) and in 'parallel' "
                            f"({nested}); set it once")
        if nested is not None:
            parsed.settings[name], parsed.sources[name] = nested, f"parallel.{name}"
        elif flat is not None:
            parsed.settings[name], parsed.sources[name] = flat, name


def _text_content(content: Any, i: int) -> str:
    param = f"messages[{i}].content"
    if isinstance(content, str):
        return checked_text(content, param)
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise bad(param, "only text content parts ({'type': 'text', 'text': ...}) are "
                                  "supported")
            parts.append(checked_text(part["text"], param))
        return "\n".join(parts)
    raise bad(param, "message content must be a string or a list of text parts")


def parse_chat(body: dict[str, Any]) -> ParsedRequest:
    parsed = _common(body, "chat")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "'messages' must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}]", "each message must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise bad(f"messages[{i}].role", f"unsupported role {short(role)}; use system, "
                                              "developer, user or assistant")
        out.append({"role": "system" if role == "developer" else role,
                    "content": _text_content(m.get("content"), i)})
    if out[-1]["role"] != "user":
        raise bad("messages", "the last message must be the user's question")
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
        raise bad("prompt", "'prompt' must be a string, a list of token ids, or a non-empty "
                             "list of those (a batch)")
    if len(prompts) > MAX_PROMPTS:
        raise bad("prompt", f"a batch holds at most {MAX_PROMPTS} prompts, got {len(prompts)}")
    if len(prompts) * parsed.n > MAX_CHOICES:
        raise bad("n", f"{len(prompts)} prompts x n={parsed.n} is more than {MAX_CHOICES} "
                        "choices; split the batch")
    parsed.prompts = [checked_text(p, "prompt") if isinstance(p, str) else list(p)
                      for p in prompts]
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

