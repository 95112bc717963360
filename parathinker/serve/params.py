"""A `ParsedRequest` -> SamplingParams: the server's defaults, fitted to the request.

    params = sampling_params(parsed, defaults, prompt_len, context, template_len, layout, has_bos)

Explicit settings win and are checked; a default the request left out is lowered to fit it (the
context through spec/budgets, the one statement of the context rule; then the client's cap), so
a request that sets no budget never gets a budget 400 (docs/SERVE.md "Budgets" has the rule and
a table of examples). A refusal is an APIError whose `param` names the request field at fault
(`param_of`, also for llm.validate's messages).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from parathinker.config import SamplingParams
from parathinker.serve.fields import APIError, bad
from parathinker.serve.requests import PARALLEL_KEYS, ParsedRequest
from parathinker.spec.budgets import check_context, path_room, round_paths

# SamplingParams fields in the order their names are looked for at the start of an error message
_FIELDS = ("min_finished_paths", "max_summary_tokens", "max_path_tokens", "min_path_tokens",
           "num_paths", "temperature", "top_p", "top_k", "seed", "confidence_window",
           "confidence_top_k", "prune_confidence", "stop_on_agreement")
PATH_FLOOR = 64  # a derived path budget is at least min(64, what fits); else fewer paths


def sampling_params(parsed: ParsedRequest, defaults: SamplingParams, prompt_len: int,
                    context: int, template_len: int, layout: str = "native",
                    has_bos: bool = True) -> SamplingParams:
    """Explicit settings over the defaults (the `parathinker serve` flags; seed None). Defaults
    the request left out are fitted: max_summary_tokens lowered when the context would leave the
    paths fewer than min(PATH_FLOOR, what fits) positions (`context_summary`); max_path_tokens
    to what the context leaves after the prompt and the summary in this layout
    (spec/budgets.path_room; in 16s for the reference layout, SPEC §6); with a cap, the paths and
    the budgets to it (`fit_to_cap`); min_finished_paths and stop_on_agreement <= num_paths,
    min_path_tokens <= max_path_tokens. The gating fields (confidence_window, confidence_top_k,
    prune_confidence, stop_on_agreement) pass through as set; SamplingParams checks them."""
    s = dict(parsed.settings)
    least = round_paths(2, layout)  # the smallest path budget the layout runs

    def room(summary: int) -> int:
        return path_room(context, prompt_len, summary, layout, has_bos)

    if "max_summary_tokens" not in s:
        s["max_summary_tokens"] = context_summary(defaults.max_summary_tokens, template_len,
                                                  room, layout)
    elif room(s["max_summary_tokens"]) < least <= room(template_len + 1):
        try:  # the prompt alone would fit: the client's summary budget leaves the paths nothing
            check_context(prompt_len, least, s["max_summary_tokens"], context, layout, has_bos)
        except ValueError as e:
            raise bad(parsed.sources["max_summary_tokens"], str(e)) from None
    if room(template_len + 1) < least and prompt_len < context:
        raise bad(parsed.prompt_param, f"the prompt ({prompt_len} tokens) leaves too little of "
                                       f"the model's context ({context} positions) for paths of "
                                       f"{least} tokens and a summary of its {template_len}-token "
                                       "template and one more; shorten it")
    fits = room(s["max_summary_tokens"])  # the longest paths the context holds
    if parsed.cap is not None:
        fit_to_cap(s, parsed, defaults, template_len, layout, fits)
    s.setdefault("num_paths", defaults.num_paths)
    s.setdefault("min_finished_paths", min(defaults.min_finished_paths, max(s["num_paths"], 1)))
    if "max_path_tokens" not in s:  # nothing fits: the default, and llm.validate explains
        s["max_path_tokens"] = round_paths(min(defaults.max_path_tokens, fits), layout) \
            if fits >= least else defaults.max_path_tokens
    s.setdefault("min_path_tokens", min(defaults.min_path_tokens, s["max_path_tokens"]))
    for name in ("temperature", "top_p", "top_k", "confidence_window", "confidence_top_k",
                 "prune_confidence"):
        s.setdefault(name, getattr(defaults, name))
    s.setdefault("stop_on_agreement", min(defaults.stop_on_agreement, max(s["num_paths"], 1)))
    try:
        return SamplingParams(**s)
    except ValueError as e:
        raise APIError(400, str(e), param=param_of(str(e), parsed)) from None


def context_summary(default: int, template_len: int, room: Callable[[int], int],
                    layout: str = "native") -> int:
    """The default summary budget, lowered (never below the template + 1) until the paths get
    min(PATH_FLOOR, the most any summary leaves them) positions; the default when nothing fits."""
    want = min(round_paths(PATH_FLOOR, layout), room(template_len + 1))
    if want < round_paths(2, layout) or room(default) >= want:
        return default
    lo, hi = template_len + 1, default  # room(lo) >= want > room(hi); room never grows with it
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if room(mid) >= want else (lo, mid)
    return lo


def fit_to_cap(s: dict[str, Any], parsed: ParsedRequest, defaults: SamplingParams,
               template_len: int, layout: str = "native", fits: int = 1 << 30) -> None:
    """The client's cap C bounds every generated token: P paths of max_path_tokens (tags
    included) plus the summary after its forced template. Budgets the request left out split C
    (as before: each path min(default, C // (P + 1)), the summary what is left): first fewer
    paths, until each gets min(PATH_FLOOR, what the context and --max-path-tokens allow), then
    shorter ones; the summary gets at least one token. A cap below the smallest request (one
    path of its two tags and one summary token) runs that request: 200 with finish_reason
    "length". Budgets the request set must fit within C, else a 400 naming the cap with the
    smallest one that fits them."""
    cap, param = parsed.cap, parsed.cap_param or "max_tokens"
    assert cap is not None
    T, least, mine = template_len, round_paths(2, layout), parsed.settings
    summary_need = s["max_summary_tokens"] - T if "max_summary_tokens" in mine else 1
    limit = min(defaults.max_path_tokens, fits)  # the longest derived path

    def share(p: int) -> int:  # each path's share of the cap with p paths
        if "max_path_tokens" in s:
            return s["max_path_tokens"]
        split = (cap - summary_need) // p if "max_summary_tokens" in mine else cap // (p + 1)
        return round_paths(max(least, min(limit, split)), layout)

    if "num_paths" not in s:
        floor = min(round_paths(PATH_FLOOR, layout), limit)
        p = defaults.num_paths
        # the client's min_finished_paths and stop_on_agreement stay valid
        lowest = max(1, min(max(s.get("min_finished_paths", 1), s.get("stop_on_agreement", 0)), p))
        while p > lowest and (p * share(p) + summary_need > cap
                              or "max_path_tokens" not in s and share(p) < floor):
            p -= 1
        s["num_paths"] = p
    num_paths = max(1, s["num_paths"])
    if "max_path_tokens" not in s:
        s["max_path_tokens"] = share(num_paths)
        parsed.sources["max_path_tokens"] = param
    if "max_summary_tokens" not in mine:
        left = max(1, cap - num_paths * s["max_path_tokens"])
        s["max_summary_tokens"] = T + min(s["max_summary_tokens"] - T, left)
        parsed.sources["max_summary_tokens"] = param
    generated = num_paths * s["max_path_tokens"] + s["max_summary_tokens"] - T
    if generated > cap and any(k in mine for k in ("num_paths", "max_path_tokens",
                                                   "max_summary_tokens")):
        paths = s["num_paths"] if "num_paths" in mine else 1
        path = s["max_path_tokens"] if "max_path_tokens" in mine else least
        summary = (f"max_summary_tokens={s['max_summary_tokens']} ({summary_need} after its "
                   f"{T}-token template)" if "max_summary_tokens" in mine else
                   "at least one token after its template")
        raise bad(param, f"'{param}'={cap} cannot hold {num_paths} path(s) of max_path_tokens="
                         f"{s['max_path_tokens']} (tags included) and a summary of {summary}: "
                         f"use at least {paths * path + summary_need}, or lower the parallel "
                         "budgets you set")


def param_of(message: str, parsed: ParsedRequest) -> str | None:
    """The request field a SamplingParams / llm.validate message is about."""
    for name in _FIELDS:
        if message.startswith(name):
            return parsed.sources.get(name, f"parallel.{name}" if name in PARALLEL_KEYS else name)
    if message.startswith(("prompt (", "layout=")):  # prompt + budgets beyond the context
        for name in ("max_path_tokens", "max_summary_tokens"):
            if name in parsed.settings:  # a budget the client set, else the prompt
                return parsed.sources[name]
    if message.startswith(("prompt", "empty prompt", "layout=")):
        return parsed.prompt_param
    return None
