"""Token budgets that fit a checkpoint's context: what `generate`, `eval` and `build-data` cap.

    fit = ContextFit(model)                          # config.json + tokenizer, no weights
    lp = fit.longest([fit.prompt(q) for q in questions])
    max_path = fit.cap("--max-path-tokens", max_path, path_room(fit.context, lp, max_summary))

A budget the context cannot hold is lowered to what it can, with one note on stderr naming the
flag, the model's context and the value used (`serve` fits each request's budgets the same way).
`generate` and `serve` fit their flags with `fit_path_args` before resolving the rope scaling from
--max-path-tokens, as `eval` does (eval/fit.py): a budget the model cannot run never turns on YaRN.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable

from parathinker.reference_layout import REFERENCE_BLOCK_SIZE, padded_prompt_len, summary_cap
from parathinker.tokens import DEFAULT_PROMPT_TEMPLATE

DEFAULT_CONTEXT = 32768  # as ModelConfig.from_dict when config.json names none


def path_room(context: int, prompt_len: int, max_summary_tokens: int, layout: str = "native",
              has_bos: bool = True) -> int:
    """The largest max_path_tokens that LLM.validate accepts for this prompt and summary budget:
    native, prompt + paths + summary <= context (SPEC §4); reference, 2 x padded prompt + paths +
    the summary cap <= context, paths a multiple of 16 (SPEC §6)."""
    if layout == "reference":
        room = context - 2 * padded_prompt_len(prompt_len, has_bos) - summary_cap(max_summary_tokens)
        return room // REFERENCE_BLOCK_SIZE * REFERENCE_BLOCK_SIZE
    return context - prompt_len - max_summary_tokens


class ContextFit:
    """A model's context and tokenizer (no weights), to cap the budgets of a command."""

    def __init__(self, model: str) -> None:
        from parathinker.model.checkpoint import load_tokenizer, resolve_model_dir

        self.model = model
        model_dir = resolve_model_dir(model)
        raw = json.loads((model_dir / "config.json").read_text()) \
            if (model_dir / "config.json").exists() else {}
        self.context = int(raw.get("max_position_embeddings", DEFAULT_CONTEXT))
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
