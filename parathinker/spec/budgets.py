"""Token budgets that fit a checkpoint's context: what `generate`, `eval` and `build-data` cap.

    fit = ContextFit(model)                          # config.json + tokenizer, no weights
    lp = fit.longest([fit.prompt(q) for q in questions])
    max_path = fit.cap("--max-path-tokens", max_path, path_room(fit.context, lp, max_summary))

A budget the context cannot hold is lowered to what it can, with one note on stderr naming the
flag, the model's context and the value used (`serve` fits request budgets the same way).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable

from parathinker.spec.reference_layout import REFERENCE_BLOCK_SIZE, padded_prompt_len, summary_cap
from parathinker.spec.tokens import DEFAULT_PROMPT_TEMPLATE

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
