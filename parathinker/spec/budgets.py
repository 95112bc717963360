"""Token budgets against a checkpoint's context: the one statement of the context rule, and the
fitting that `generate`, `eval`, `build-data` and `serve` do with it.

A ParaThinker request reaches `positions(...)`: every path restarts where the prompt ends and the
summary follows the longest path, so
- native (SPEC §4): prompt + max_path_tokens + max_summary_tokens <= context;
- reference (SPEC §6): 2 x padded prompt + max_path_tokens + summary cap <= context (the summary
  starts at 2·Lp + L), max_path_tokens a multiple of REFERENCE_BLOCK_SIZE (16).
A plain trace (the sequential and majority baselines): prompt + max_tokens <= context.

    check_context(prompt_len, max_path, max_summary, context, layout, has_bos)  # ValueError
    check_trace(prompt_len, max_tokens, context)                       # plain traces
    room = path_room(context, prompt_len, max_summary, layout, has_bos)  # largest max_path that fits
    fit = ContextFit(model)                          # config.json + tokenizer, no weights
    lp = fit.longest([fit.prompt(q) for q in questions])
    max_path = fit.cap("--max-path-tokens", max_path, path_room(fit.context, lp, max_summary))

A command's budget the context cannot hold is lowered to what it can, with one note on stderr
naming the flag, the model's context and the value used; `serve` fits the budgets a request left
out with the same path_room and round_paths. `generate` and `serve` fit their flags with
`fit_path_args` before resolving the rope scaling from --max-path-tokens, as `eval` does
(eval/fit.py): a budget the model cannot run never turns on YaRN.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from parathinker.spec.reference_layout import REFERENCE_BLOCK_SIZE, padded_prompt_len, summary_cap
from parathinker.spec.tokens import DEFAULT_PROMPT_TEMPLATE

DEFAULT_CONTEXT = 32768  # as ModelConfig.from_dict when config.json names none


@dataclass(frozen=True)
class Positions:
    """The positions a request reaches, by piece (messages name them)."""

    prompt: int  # native: the prompt; reference: 2 x the padded prompt
    paths: int  # max_path_tokens
    summary: int  # native: max_summary_tokens; reference: its cap (summary_cap)

    @property
    def total(self) -> int:
        return self.prompt + self.paths + self.summary


def positions(prompt_len: int, max_path_tokens: int, max_summary_tokens: int,
              layout: str = "native", has_bos: bool = True) -> Positions:
    if layout == "reference":
        return Positions(2 * padded_prompt_len(prompt_len, has_bos), max_path_tokens,
                         summary_cap(max_summary_tokens))
    return Positions(prompt_len, max_path_tokens, max_summary_tokens)


def check_context(prompt_len: int, max_path_tokens: int, max_summary_tokens: int, context: int,
                  layout: str = "native", has_bos: bool = True) -> None:
    """ValueError, naming each piece, when the request's positions exceed the context."""
    need = positions(prompt_len, max_path_tokens, max_summary_tokens, layout, has_bos)
    if need.total <= context:
        return
    if layout == "reference":
        raise ValueError(
            f"layout='reference' places the summary at 2 x padded prompt ({need.prompt // 2}) + "
            f"max_path_tokens ({need.paths}); with its {need.summary} tokens that is {need.total} "
            f"positions, more than the model's context ({context}); lower the budgets")
    raise ValueError(
        f"prompt ({need.prompt}) + max_path_tokens ({need.paths}) + max_summary_tokens "
        f"({need.summary}) = {need.total} positions exceed the model's context ({context}); "
        "lower the budgets")


def path_multiple(layout: str) -> int:
    """max_path_tokens must be a multiple of this: the reference's 16-token blocks (SPEC §6)."""
    return REFERENCE_BLOCK_SIZE if layout == "reference" else 1


def round_paths(max_path_tokens: int, layout: str = "native") -> int:
    """A path budget rounded down to what the layout accepts, never below one multiple (a budget
    too small is left for check_context and SamplingParams to explain)."""
    m = path_multiple(layout)
    return max_path_tokens if m == 1 else max(m, max_path_tokens // m * m)


def path_room(context: int, prompt_len: int, max_summary_tokens: int, layout: str = "native",
              has_bos: bool = True) -> int:
    """The largest max_path_tokens that check_context accepts for this prompt and summary budget
    (<= 0: none)."""
    m = path_multiple(layout)
    return (context - positions(prompt_len, 0, max_summary_tokens, layout, has_bos).total) // m * m


def trace_room(context: int, prompt_len: int) -> int:
    """The largest max_tokens of a plain trace (the sequential and majority baselines)."""
    return context - prompt_len


def check_trace(prompt_len: int, max_tokens: int, context: int) -> None:
    """ValueError when a plain trace's positions exceed the context."""
    if max_tokens > trace_room(context, prompt_len):
        raise ValueError(f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceed the "
                         f"model's context ({context} positions); lower max_tokens")


class ContextFit:
    """A model's context and tokenizer (no weights), to cap the budgets of a command. `context`:
    the context a server reports for it (eval --endpoint) instead of its config.json's."""

    def __init__(self, model: str, context: int | None = None) -> None:
        from parathinker.model.checkpoint import load_tokenizer, resolve_model_dir

        self.model = model
        model_dir = resolve_model_dir(model)
        raw = json.loads((model_dir / "config.json").read_text()) \
            if (model_dir / "config.json").exists() else {}
        self.context = int(raw.get("max_position_embeddings", DEFAULT_CONTEXT)) if context is None \
            else context
        self.tokenizer = load_tokenizer(model_dir)
        self.has_bos = self.tokenizer.bos_token_id is not None

    def longest(self, texts: Iterable[str]) -> int:
        """Tokens of the longest text, encoded as LLM.encode_prompts does."""
        return max((len(self.tokenizer.encode(t)) for t in texts), default=0)

    @staticmethod
    def prompt(question: str, template: str = DEFAULT_PROMPT_TEMPLATE) -> str:
        return template.replace("{question}", question)

    def cap(self, flag: str, value: int, room: int, what: str = "") -> int:
        """`value` if it fits in `room` (or nothing fits: the command's own check then explains);
        else `room`, with a note."""
        if value <= room or room <= 0:
            return value
        print(f"note: {flag} {value} does not fit {self.model}'s context of {self.context} "
              f"positions{what}; using {room}", file=sys.stderr)
        return room


def fit_path_args(args: argparse.Namespace, question: str | None) -> None:
    """args.max_path_tokens (and args.min_path_tokens) lowered to what args.model's context leaves
    after the prompt of `question` and args.max_summary_tokens, with a note. `question` None
    (`serve`, before any request): after an empty prompt, the longest paths a request could get."""
    fit = ContextFit(args.model)
    prompt_len = 0 if question is None else fit.longest([fit.prompt(question)])
    room = path_room(fit.context, prompt_len, args.max_summary_tokens, args.layout, fit.has_bos)
    what = "an empty" if question is None else f"this {prompt_len}-token"
    args.max_path_tokens = fit.cap("--max-path-tokens", args.max_path_tokens, room,
                                   f" with {what} prompt and --max-summary-tokens "
                                   f"{args.max_summary_tokens}")
    args.min_path_tokens = min(args.min_path_tokens, args.max_path_tokens)
