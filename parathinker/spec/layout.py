"""Layout of one ParaThinker request (SPEC §4): pure functions of integers.

A request is a prompt of `prompt_len` tokens, P paths (path k, 1-based, holds `path_lens[k-1]`
tokens counting its `<think{k}>` and `</think{k}>`) and a summary. Packed order is
prompt, path 1, ..., path P, summary. Training packs exactly this order into one row; the
generator and the engine place tokens at the same positions and segments, and give each token
the same visibility. Everything here returns plain Python ints and lists, so the scheduler
(which never imports torch) can use it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

PROMPT = 0  # region id of prompt tokens; path k has region k
SUMMARY = -1  # region id of summary tokens


def path_segment(k: int) -> int:
    """Segment id of path k (1-based); the prompt and the summary have segment 0."""
    if k < 1:
        raise ValueError(f"path index is 1-based, got {k}")
    return k


def path_positions(prompt_len: int, path_len: int) -> list[int]:
    """Every path restarts at position `prompt_len`."""
    return list(range(prompt_len, prompt_len + path_len))


def summary_start(prompt_len: int, path_lens: Sequence[int]) -> int:
    """First position of the summary: after the prompt and the longest path."""
    return prompt_len + (max(path_lens) if path_lens else 0)


def summary_positions(prompt_len: int, path_lens: Sequence[int], summary_len: int) -> list[int]:
    start = summary_start(prompt_len, path_lens)
    return list(range(start, start + summary_len))


@dataclass(frozen=True)
class RequestLayout:
    """Per-token vectors of one packed request, in packed order."""

    positions: list[int]
    segment_ids: list[int]
    regions: list[int]  # PROMPT, k for path k, SUMMARY

    def __len__(self) -> int:
        return len(self.positions)


def request_layout(prompt_len: int, path_lens: Sequence[int], summary_len: int) -> RequestLayout:
    positions = list(range(prompt_len))
    segment_ids = [0] * prompt_len
    regions = [PROMPT] * prompt_len
    for k, n in enumerate(path_lens, start=1):
        positions += path_positions(prompt_len, n)
        segment_ids += [path_segment(k)] * n
        regions += [k] * n
    positions += summary_positions(prompt_len, path_lens, summary_len)
    segment_ids += [0] * summary_len
    regions += [SUMMARY] * summary_len
    return RequestLayout(positions, segment_ids, regions)


def can_see(q_idx, kv_idx, q_region, kv_region, q_doc=0, kv_doc=0):
    """The visibility rule, written once for ints, bools and tensors alike.

    In packed order, a token sees earlier-or-equal tokens of the same document that are in the
    prompt, in its own region, or anywhere if the token is in the summary.
    Works elementwise on torch tensors (FlexAttention mask_mod, dense masks) and on ints.
    """
    same_doc = q_doc == kv_doc
    causal = kv_idx <= q_idx
    region_ok = (kv_region == PROMPT) | (kv_region == q_region) | (q_region == SUMMARY)
    return causal & same_doc & region_ok


def visibility(prompt_len: int, path_lens: Sequence[int], summary_len: int) -> list[list[bool]]:
    """Dense [L, L] visibility of one request (row = query, column = key); for tests and
    small cases. Training uses `can_see` directly to avoid materialising L x L."""
    regions = request_layout(prompt_len, path_lens, summary_len).regions
    n = len(regions)
    return [[bool(can_see(q, kv, regions[q], regions[kv])) for kv in range(n)] for q in range(n)]
