"""An eval's token budgets, lowered to what the model's context holds for its longest prompt.

    cfg = fit_to_context(cfg, problems)     # before planning; a note per lowered flag
    cfg = fit_to_context(cfg, problems, {"native": 2048, None: 4096})   # --endpoint: served contexts

The engine refuses a request whose prompt and budgets exceed the context; without this, the
defaults (16,384-token paths, 32,768-token sequential traces) could not run on a small model.
With --endpoint the context is each kind of server's `max_model_len` from /v1/models (by layout;
None: the plain servers of sequential and majority traces) and the prompts are counted with
--model's tokenizer, which must then be a local checkpoint directory (else nothing is fitted,
with a note, and a server refuses what does not fit). The fitted values are the ones recorded
and compared on --resume (the same flags fit the same).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from parathinker.spec.budgets import ContextFit, path_room, trace_room
from parathinker.eval.config import EvalConfig
from parathinker.spec.tokens import SEQUENTIAL_PROMPT_TEMPLATE


def _fits(cfg: EvalConfig, served: dict[str | None, int] | None) -> dict[str | None, ContextFit]:
    """The context and tokenizer that each kind of job (a layout; None: plain traces) runs with."""
    if cfg.backend == "engine":
        fit = ContextFit(cfg.model)
        return {k: fit for k in (*cfg.layouts, None)}
    if not served:
        return {}
    if not Path(cfg.model).is_dir():
        print(f"note: --model {cfg.model} is not a local checkpoint directory, so the prompts cannot "
              "be counted: the budgets are not fitted to the servers' context", file=sys.stderr)
        return {}
    by_context = {c: ContextFit(cfg.model, c) for c in set(served.values())}
    return {kind: by_context[c] for kind, c in served.items()}


def fit_to_context(cfg: EvalConfig, problems: dict[str, list[dict[str, Any]]],
                   served: dict[str | None, int] | None = None) -> EvalConfig:
    questions = [p["problem"] for rows in problems.values() for p in rows]
    fits = _fits(cfg, served) if questions else {}
    if not fits:
        return cfg
    fit = next(iter(fits.values()))
    resolved = {"max_path_tokens": cfg.max_path_tokens, "max_tokens": cfg.sequential_max_tokens,
                "majority_max_tokens": cfg.vote_max_tokens}
    fitted = dict(resolved)
    layouts = [layout for layout in cfg.layouts if layout in fits]
    if "parathinker" in cfg.modes and layouts:
        lp = fit.longest(fit.prompt(q) for q in questions)
        rooms = {layout: path_room(fits[layout].context, lp, cfg.max_summary_tokens, layout, fit.has_bos)
                 for layout in layouts}
        layout = min(rooms, key=rooms.__getitem__)
        room, fit = rooms[layout], fits[layout]
        fitted["max_path_tokens"] = fit.cap(
            "--max-path-tokens", cfg.max_path_tokens, room,
            f" with the longest prompt ({lp} tokens) and --max-summary-tokens {cfg.max_summary_tokens}")
    plain = {"sequential": ("max_tokens", "--max-tokens"),
             "majority": ("majority_max_tokens", "--majority-max-tokens")}
    if any(mode in cfg.modes for mode in plain) and None in fits:
        fit = fits[None]
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
