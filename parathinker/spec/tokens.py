"""Control tokens looked up by name (SPEC §2), and the prompt / summary templates (SPEC §3).

No token id is ever hard-coded: every id comes from the tokenizer's vocabulary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

DEFAULT_PROMPT_TEMPLATE = (
    "<｜User｜>{question} You FIRST think about the reasoning process as an internal monologue "
    "and then summarize the reasoning process to get the final answer. The summary process MUST "
    "BE enclosed within <summary> </summary> tags. The final answer MUST BE put in "
    "\\boxed{}.<｜Assistant｜><think>"
)
DEFAULT_SUMMARY_TEMPLATE = (
    "<summary>By analyzing multiple reasoning processes above, I concluded that: "
    "The final answer is"
)
# A plain single-trace prompt (sequential baselines), the DeepSeek-R1-Distill chat format.
SEQUENTIAL_PROMPT_TEMPLATE = (
    "<｜User｜>{question} Please reason step by step, and put your final answer within "
    "\\boxed{}.<｜Assistant｜><think>\n"
)

NUM_DEFAULT_PATH_TOKENS = 8
SUMMARY_OPEN, SUMMARY_CLOSE, PAD = "<summary>", "</summary>", "<vllm_pad>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def think_open(k: int) -> str:
    return f"<think{k}>"


def think_close(k: int) -> str:
    return f"</think{k}>"


def _vocab(tokenizer: Any) -> dict[str, int]:
    return tokenizer.get_vocab()


@dataclass(frozen=True)
class ControlTokens:
    """Ids of the ParaThinker control tokens in one tokenizer."""

    think_open: tuple[int, ...]  # index k-1 -> id of <think{k}>; () for a base model
    think_close: tuple[int, ...]  # index k-1 -> id of </think{k}>
    summary_open: int | None  # None only for a base model (plain traces only)
    summary_close: int | None
    eos: int
    pad: int | None = None  # <vllm_pad>
    base_think_open: int | None = None  # <think>
    base_think_close: int | None = None  # </think>

    @property
    def max_paths(self) -> int:
        return len(self.think_open)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, allow_base: bool = False) -> ControlTokens:
        """The tokenizer's control tokens. With `allow_base`, a tokenizer without any ParaThinker
        token (a base model such as DeepSeek-R1-Distill-Qwen-1.5B) gives ids with no path or
        summary tokens: enough for plain traces, and `max_paths == 0` says what it is."""
        vocab = _vocab(tokenizer)
        opens, closes = [], []
        k = 1
        while think_open(k) in vocab and think_close(k) in vocab:
            opens.append(vocab[think_open(k)])
            closes.append(vocab[think_close(k)])
            k += 1
        missing = [t for t in (SUMMARY_OPEN, SUMMARY_CLOSE) if t not in vocab]
        if not opens:
            missing.insert(0, "<think1>/</think1>")
        eos = tokenizer.eos_token_id
        if eos is None:
            missing.append("an EOS token")
        base = allow_base and eos is not None and not opens and len(missing) == 3
        if missing and not base:
            raise ValueError(
                f"tokenizer lacks the ParaThinker control tokens {missing}; "
                "add them with parathinker.spec.tokens.add_parathinker_tokens(tokenizer, model)"
            )
        if base:
            return cls((), (), None, None, int(eos), vocab.get(PAD), vocab.get(THINK_OPEN),
                       vocab.get(THINK_CLOSE))
        return cls(
            think_open=tuple(opens),
            think_close=tuple(closes),
            summary_open=vocab[SUMMARY_OPEN],
            summary_close=vocab[SUMMARY_CLOSE],
            eos=int(eos),
            pad=vocab.get(PAD),
            base_think_open=vocab.get(THINK_OPEN),
            base_think_close=vocab.get(THINK_CLOSE),
        )

    def path_end_ids(self) -> list[int]:
        """Tokens that end a path when chosen (SPEC §5.3): any </think{j}>, </think>, EOS."""
        ids = list(self.think_close) + [self.eos]
        if self.base_think_close is not None:
            ids.append(self.base_think_close)
        return sorted(set(ids))

    def path_banned_ids(self) -> list[int]:
        """Never emitted inside a path: <think{j}>, <think>, <summary>, </summary>, <vllm_pad>."""
        ids = list(self.think_open)
        ids += [t for t in (self.summary_open, self.summary_close, self.base_think_open, self.pad)
                if t is not None]
        return sorted(set(ids))

    def summary_banned_ids(self) -> list[int]:
        """Never emitted in the summary: every path tag, <think>, </think>, <summary>, pad."""
        ids = list(self.think_open) + list(self.think_close)
        ids += [t for t in (self.summary_open, self.base_think_open, self.base_think_close, self.pad)
                if t is not None]
        return sorted(set(ids))

    def summary_end_ids(self) -> list[int]:
        return sorted({t for t in (self.summary_close, self.eos) if t is not None})

    @property
    def path_end_set(self) -> frozenset[int]:
        return frozenset(self.path_end_ids())

    @property
    def summary_end_set(self) -> frozenset[int]:
        return frozenset(self.summary_end_ids())


def parathinker_token_names(num_paths: int = NUM_DEFAULT_PATH_TOKENS) -> list[str]:
    names = []
    for k in range(1, max(num_paths, NUM_DEFAULT_PATH_TOKENS) + 1):
        names += [think_open(k), think_close(k)]
    return names + [SUMMARY_OPEN, SUMMARY_CLOSE, PAD]


def add_parathinker_tokens(tokenizer: Any, model: Any = None, num_paths: int = 8) -> list[str]:
    """Add the missing ParaThinker tokens (and <think{k}> up to `num_paths`) to `tokenizer`.

    If `model` is given and the tokenizer now outgrows its embedding table, the embeddings are
    resized (`model.resize_token_embeddings`). Returns the names that were added.
    """
    vocab = _vocab(tokenizer)
    missing = [t for t in parathinker_token_names(num_paths) if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    if model is not None and len(tokenizer) > model.vocab_size:
        model.resize_token_embeddings(len(tokenizer))
    return missing


_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}`/`\\fbox{...}` (braces matched, stripped), or of
    `\\boxed 5` (the next word). The one extractor: `RequestOutput.answer`, eval grading, build-data.

    An unclosed box at the end (a truncated response) is skipped in favour of the one before it.
    """
    for m in reversed(list(_BOX_RE.finditer(text))):
        i = m.end()
        while i < len(text) and text[i].isspace():
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    return text[i + 1 : j].strip()
            continue  # unclosed: try an earlier box
        if i > m.end():  # "\\boxed 5": the next word, up to whitespace or `$`
            word = re.match(r"[^\s$]+", text[i:])
            if word:
                return word.group(0).rstrip(".")
    return None
