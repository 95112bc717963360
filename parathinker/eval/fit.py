"""An eval's token budgets, lowered to what the model's context holds for its longest prompt.

    cfg = fit_to_context(cfg, problems)     # before planning; a note per lowered flag

The engine refuses a request whose prompt and budgets exceed the context; without this, the
defaults (16,384-token paths, 32,768-token sequential traces) could not run on a small model.
The fitted values are the ones recorded and compared on --resume (the same flags fit the same).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from parathinker.spec.budgets import ContextFit, path_room, trace_room
from parathinker.eval.config import EvalConfig
from parathinker.spec.tokens import SEQUENTIAL_PROMPT_TEMPLATE


def fit_to_context(cfg: EvalConfig, problems: dict[str, list[dict[str, Any]]]) -> EvalConfig:
    if cfg.backend != "engine":  # a server fits its own requests
        return cfg
    questions = [p["problem"] for rows in problems.values() for p in rows]
    if not questions:
        return cfg
    fit = ContextFit(cfg.model)
    resolved = {"max_path_tokens": cfg.max_path_tokens, "max_tokens": cfg.sequential_max_tokens,
                "majority_max_tokens": cfg.vote_max_tokens}
    fitted = dict(resolved)
    if "parathinker" in cfg.modes:
        lp = fit.longest(fit.prompt(q) for q in questions)
        room = min(path_room(fit.context, lp, cfg.max_summary_tokens, layout, fit.has_bos)
                   for layout in cfg.layouts)
        fitted["max_path_tokens"] = fit.cap(
            "--max-path-tokens", cfg.max_path_tokens, room,
            f" with the longest prompt ({lp} tokens) and --max-summary-tokens {cfg.max_summary_tokens}")
    plain = {"sequential": ("max_tokens", "--max-tokens"),
             "majority": ("majority_max_tokens", "--majority-max-tokens")}
    if any(mode in cfg.modes for mode in plain):
        lp = fit.longest(fit.prompt(q, SEQUENTIAL_PROMPT_TEMPLATE) for q in questions)
        for mode, (field, flag) in plain.items():
            if mode in cfg.modes:
                fitted[field] = fit.cap(flag, resolved[field], trace_room(fit.context, lp),
                                        f" with the longest prompt ({lp} tokens)")
    lowered = {k: v for k, v in fitted.items() if v < resolved[k]}
    if "max_path_tokens" in lowered:
        for k in ("max_tokens", "majority_max_tokens"):
            if getattr(cfg, k) is None:  # its default follows --max-path-tokens: pin what it was
                lowered.setdefault(k, fitted[k])
    return dataclasses.replace(cfg, **lowered) if lowered else cfg
