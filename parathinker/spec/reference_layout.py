"""The released vLLM fork's own layout (SPEC §6, REFERENCE §3.2-§5), as pure functions of ints.

`LLM(..., layout="reference")` runs requests the way the reference engine ran the model card's
evaluation, so that its numbers can be reproduced; the native layout (SPEC §4-5) stays the
default. What differs, and where each rule comes from:

- Prompt (`pad_prompt`): the example's `prompts_preprocess` encodes the prompt (BOS added),
  appends `<vllm_pad>` until `len + 1` is a multiple of 16, decodes the ids back to a string, and
  vLLM re-encodes that string, adding a second BOS in front of the decoded one. The engine
  therefore runs `[BOS, BOS, ..., <think>, pad, ...]`, length a multiple of 16.
- Paths: lock-step, no logit masks; each step the output processor first runs the stop checker
  on every path's current last token (pass 1: `check_path`), ends thinking once
  `#finished >= 0.1 * P` (`is_thinking_over`), and otherwise appends one token per unfinished
  path, rewritten after sampling (pass 2: `path_token`). A path that sampled a stop id holds its
  own `</think{k}>`, then `<vllm_pad>` (segment k, consecutive positions) until its length is a
  multiple of 16; a path ends at `max_tokens` too. Paths still running when thinking ends are
  truncated where they are, without an end tag, so every path has the same length L.
- Summary (`summary_token`, `summary_end`): `<summary>` at position `2 * Lp + L` (Lp = padded
  prompt length), then the template forced one token per decode step, then free sampling; a
  stop id ends it (written as `</summary>`), and it holds at most 128 tokens, `<summary>` included.

Block size 16 is the reference's, independent of the engine's own KV block size. Only
`ControlTokens` is imported: no torch, so the scheduler side can use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from parathinker.spec.layout import PROMPT, SUMMARY, RequestLayout
from parathinker.spec.tokens import ControlTokens

END, BUDGET, CUT = "end", "budget", "cut"
REFERENCE_BLOCK_SIZE = 16  # vLLM's default block_size, asserted by the example
REFERENCE_SUMMARY_TOKENS = 128  # SamplingParams.summary_max_tokens, counted from <summary>
FIRST_FINISH_RATIO = 0.1  # SequenceGroup.is_think_stage_finished(ratio_threshold=0.1)
MAX_REFERENCE_PATHS = 10  # ratio 0.1 means "one finished path" only up to 10 paths


@dataclass(frozen=True)
class ReferenceTokens:
    """The ids the reference's output processor and stop checker use (newest example, 04d84fc)."""

    think_open: tuple[int, ...]  # cot_token_ids: every <think{j}> of the tokenizer
    think_close: tuple[int, ...]  # path k's own end token is think_close[k - 1]
    think: int  # <think>: what a sampled <think{j}> or <summary> becomes inside a path
    summary_open: int
    summary_close: int
    pad: int  # <vllm_pad>
    stop_ids: frozenset[int]  # </think>, every </think{j}>, </summary>; EOS is not a stop

    @classmethod
    def from_ctrl(cls, ctrl: ControlTokens) -> ReferenceTokens:
        missing = [name for name, t in (("<think>", ctrl.base_think_open), ("<vllm_pad>", ctrl.pad),
                                        ("<summary>", ctrl.summary_open),
                                        ("</summary>", ctrl.summary_close)) if t is None]
        if not ctrl.think_open:
            missing.insert(0, "<think1>")
        if missing:
            raise ValueError(f"the reference layout needs the tokens {missing} in the tokenizer")
        assert ctrl.base_think_open is not None and ctrl.pad is not None
        assert ctrl.summary_open is not None and ctrl.summary_close is not None
        stops = set(ctrl.think_close) | {ctrl.summary_close}
        if ctrl.base_think_close is not None:
            stops.add(ctrl.base_think_close)
        return cls(tuple(ctrl.think_open), tuple(ctrl.think_close), ctrl.base_think_open,
                   ctrl.summary_open, ctrl.summary_close, ctrl.pad, frozenset(stops))

    @property
    def think_like(self) -> frozenset[int]:
        """Tokens the reference's model runner treats as region starts: <think{j}>, <summary>."""
        return frozenset(self.think_open) | {self.summary_open}


# ----- prompt
def pad_prompt(prompt_ids: Sequence[int], bos: int | None, pad: int,
               block_size: int = REFERENCE_BLOCK_SIZE) -> list[int]:
    """The prompt the reference engine runs for encoded `prompt_ids` (its BOS included).

    Token-level equivalent of decode -> re-encode: one more BOS in front (the re-encode's; none if
    the tokenizer has no BOS), then `<vllm_pad>` up to a multiple of `block_size` (no pad when the
    length already is one). This assumes the round trip is lossless, which holds for DeepSeek's
    tokenizer on the reference prompt (special tokens re-encode to themselves); ids that came from
    elsewhere (`prompt_token_ids=`) are taken as the encoded prompt, as if decoded and re-encoded.
    """
    ids = ([bos] if bos is not None else []) + list(prompt_ids)
    return ids + [pad] * (-len(ids) % block_size)


def padded_prompt_len(prompt_len: int, has_bos: bool, block_size: int = REFERENCE_BLOCK_SIZE) -> int:
    n = prompt_len + int(has_bos)
    return n + (-n % block_size)


# ----- paths
def check_path(num_held: int, last_token: int, is_padding: bool, max_tokens: int,
               tok: ReferenceTokens, block_size: int = REFERENCE_BLOCK_SIZE
               ) -> tuple[str | None, bool]:
    """Pass 1, the stop checker on a path's current state -> (finish reason, is_padding).

    `num_held` counts the path's tokens from its <think{k}>. A stop id as the last token ends the
    path if its length is a multiple of `block_size`, else starts padding; a padding path ends on
    a multiple of `block_size`; any path ends at `max_tokens` ("budget" unless it holds its end
    tag, i.e. is padding or just stopped)."""
    if last_token in tok.stop_ids:
        return (END, False) if num_held % block_size == 0 else (None, True)
    if is_padding and num_held % block_size == 0:
        return END, False
    if num_held >= max_tokens:
        return BUDGET, False
    return None, is_padding


def is_thinking_over(num_finished: int, num_paths: int) -> bool:
    """The reference's test, float ratio included: #finished >= 0.1 * P (first-finish, P <= 10)."""
    return num_finished >= num_paths * FIRST_FINISH_RATIO


def path_token(chosen: int, k: int, is_padding: bool, tok: ReferenceTokens) -> int:
    """Pass 2: the token path k (1-based) appends for a sampled `chosen`, rewritten in the
    reference's order: <think{j}>/<summary> -> <think>; a stop id -> </think{k}>; padding -> pad."""
    if chosen in tok.think_open or chosen == tok.summary_open:
        chosen = tok.think
    if chosen in tok.stop_ids:
        chosen = tok.think_close[k - 1]
    return tok.pad if is_padding else chosen


# ----- summary
def summary_first_position(prompt_len: int, path_len: int) -> int:
    """Position of <summary>: the runner adds the (padded) prompt length once more than the
    train-consistent `Lp + L` (REFERENCE §3.2)."""
    return 2 * prompt_len + path_len


def summary_cap(max_summary_tokens: int) -> int:
    """The summary holds at most this many tokens, <summary> included: the reference's 128,
    lowered (never raised) by a smaller `max_summary_tokens`."""
    return min(max_summary_tokens, REFERENCE_SUMMARY_TOKENS)


def summary_token(template_ids: Sequence[int], num_held: int, chosen: int) -> int:
    """The token the summary appends when it holds `num_held` tokens: the template's next one
    while any is left (one per decode step), else the sampled one."""
    return template_ids[num_held] if num_held < len(template_ids) else chosen


def summary_end(token: int, num_held: int, cap: int, tok: ReferenceTokens) -> tuple[int, str | None]:
    """After appending `token` (the summary now holds `num_held`): -> (token as kept, finish).
    A stop id is rewritten to </summary> and ends it; otherwise it ends at `cap` tokens."""
    if token in tok.stop_ids:
        return tok.summary_close, END
    return token, (BUDGET if num_held >= cap else None)


# ----- validation and the whole layout
def check_params(num_paths: int, max_path_tokens: int, min_path_tokens: int,
                 min_finished_paths: int, max_summary_tokens: int, template_len: int) -> None:
    """Raise ValueError for what the reference layout cannot run as the reference does."""
    if max_path_tokens % REFERENCE_BLOCK_SIZE:
        raise ValueError(f"layout='reference' needs max_path_tokens to be a multiple of "
                         f"{REFERENCE_BLOCK_SIZE} (the reference asserts it), got {max_path_tokens}")
    if num_paths > MAX_REFERENCE_PATHS:
        raise ValueError(f"layout='reference' runs at most {MAX_REFERENCE_PATHS} paths (its "
                         "first-finish rule #finished >= 0.1*P keeps all paths the same length "
                         f"only then; the released model has 8), got num_paths={num_paths}")
    if min_finished_paths != 1:
        raise ValueError("layout='reference' always stops thinking at the first finished path "
                         f"(first-finish); min_finished_paths={min_finished_paths} needs "
                         "layout='native'")
    if min_path_tokens:
        raise ValueError("layout='reference' masks no logits, so min_path_tokens cannot be "
                         f"honoured; got {min_path_tokens}, use 0 or layout='native'")
    if summary_cap(max_summary_tokens) <= template_len:
        raise ValueError(f"the summary holds at most {summary_cap(max_summary_tokens)} tokens in "
                         f"layout='reference', not more than the template's {template_len}")


def reference_layout(prompt_len: int, num_paths: int, path_len: int,
                     summary_len: int) -> RequestLayout:
    """Positions, segments and regions in the reference's KV order (prompt with its pads, path
    1..P, each of length L with its pads or truncated, summary). The visibility is SPEC §4's
    (`layout.can_see`): only the summary's positions differ."""
    positions = list(range(prompt_len))
    segment_ids = [0] * prompt_len
    regions = [PROMPT] * prompt_len
    for k in range(1, num_paths + 1):
        positions += range(prompt_len, prompt_len + path_len)
        segment_ids += [k] * path_len
        regions += [k] * path_len
    start = summary_first_position(prompt_len, path_len)
    positions += range(start, start + summary_len)
    segment_ids += [0] * summary_len
    regions += [SUMMARY] * summary_len
    return RequestLayout(positions, segment_ids, regions)


class PathTextIds:
    """The ids a path's text shows: after its <think{k}>, up to (not including) its own end tag
    `close`; the block padding after the tag is dropped. A path without its tag (truncated) shows
    all. Fed as the path grows (`add` returns the newly shown ids), or at once (`path_text_ids`)."""

    def __init__(self, close: int) -> None:
        self.close, self.is_started, self.is_ended = close, False, False

    def add(self, token_ids: Sequence[int]) -> list[int]:
        if self.is_ended or not token_ids:
            return []
        ids = list(token_ids)
        if not self.is_started:
            ids, self.is_started = ids[1:], True  # <think{k}>
        if self.close in ids:
            ids, self.is_ended = ids[: ids.index(self.close)], True
        return ids


def path_text_ids(token_ids: Sequence[int], close: int) -> list[int]:
    """All of a path's text ids (`PathTextIds`)."""
    return PathTextIds(close).add(token_ids)
