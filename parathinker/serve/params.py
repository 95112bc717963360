"""A `ParsedRequest` -> SamplingParams: the server's defaults, fitted to the request.

    params = sampling_params(parsed, defaults, prompt_len, context, template_len, layout, has_bos)

Explicit settings win; a default the request left out is fitted to it (the client's cap, then the
context through spec/budgets, the one statement of the context rule). A refusal is an APIError
whose `param` names the request field at fault (`param_of`, also for llm.validate's messages).
"""

from __future__ import annotations

from typing import Any

from parathinker.config import SamplingParams
from parathinker.serve.fields import APIError, bad
from parathinker.serve.requests import PARALLEL_KEYS, ParsedRequest
from parathinker.spec.budgets import path_room, round_paths

# SamplingParams fields in the order their names are looked for at the start of an error message
_FIELDS = ("min_finished_paths", "max_summary_tokens", "max_path_tokens", "min_path_tokens",
           "num_paths", "temperature", "top_p", "top_k", "seed")


def sampling_params(parsed: ParsedRequest, defaults: SamplingParams, prompt_len: int,
                    context: int, template_len: int, layout: str = "native",
                    has_bos: bool = True) -> SamplingParams:
    """Explicit settings over the defaults (the `parathinker serve` flags; seed None). A default
    that the request did not set is fitted to the request: min_finished_paths <= num_paths, the
    budgets to the client's cap (`fit_to_cap`), min_path_tokens <= max_path_tokens, and
    max_path_tokens to what the context leaves after the prompt and the summary in this layout
    (spec/budgets.path_room; in 16s for the reference layout, SPEC §6)."""
    s = dict(parsed.settings)
    s.setdefault("num_paths", defaults.num_paths)
    s.setdefault("min_finished_paths", min(defaults.min_finished_paths, max(s["num_paths"], 1)))
    if parsed.cap is not None:
        fit_to_cap(s, parsed, defaults, template_len, layout)
    s.setdefault("max_summary_tokens", defaults.max_summary_tokens)
    if "max_path_tokens" not in s:
        room = path_room(context, prompt_len, s["max_summary_tokens"], layout, has_bos)
        s["max_path_tokens"] = round_paths(min(defaults.max_path_tokens, room), layout) \
            if room >= 2 else defaults.max_path_tokens  # nothing fits: llm.validate explains
    s.setdefault("min_path_tokens", min(defaults.min_path_tokens, s["max_path_tokens"]))
    for name in ("temperature", "top_p", "top_k"):
        s.setdefault(name, getattr(defaults, name))
    try:
        return SamplingParams(**s)
    except ValueError as e:
        raise APIError(400, str(e), param=param_of(str(e), parsed)) from None


def fit_to_cap(s: dict[str, Any], parsed: ParsedRequest, defaults: SamplingParams,
               template_len: int, layout: str = "native") -> None:
    """The client's cap C bounds every generated token: P paths of max_path_tokens (tags
    included) plus the summary after its forced template. Budgets the request left out split C:
    each path gets min(default, max(2, C // (P + 1))), the summary what is left (up to its
    default); budgets it set must fit within C."""
    cap, param = parsed.cap, parsed.cap_param or "max_tokens"
    assert cap is not None
    num_paths = max(1, s["num_paths"])
    if "max_path_tokens" not in s:
        s["max_path_tokens"] = round_paths(
            min(defaults.max_path_tokens, max(2, cap // (num_paths + 1))), layout)
        parsed.sources["max_path_tokens"] = param
    if "max_summary_tokens" not in s:
        left = cap - num_paths * s["max_path_tokens"]
        s["max_summary_tokens"] = template_len + min(defaults.max_summary_tokens - template_len,
                                                     left)
        parsed.sources["max_summary_tokens"] = param
    generated = num_paths * s["max_path_tokens"] + s["max_summary_tokens"] - template_len
    if generated > cap or s["max_summary_tokens"] <= template_len:
        raise bad(param, f"'{param}'={cap} cannot hold {num_paths} path(s) of max_path_tokens="
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
