"""When two final answers are the same string: the grader's light normalisation, stated once.

`normalize_answer` is the equality fast path of `parathinker.eval.grade` (and its
`majority_vote(use_grader=False)`), and the rule the engine's `stop_on_agreement` compares path
answers with (`answer_key`). It is lossless for grading: two answers equal after it are equal;
two that differ may still be equivalent (`\\frac12` and `0.5`), which only math-verify, in the
eval layer, decides. The engine does not run math-verify: agreement is string equality after
this normalisation, cheap and the same on every call. Torch-free, no package imports (the
grading workers load grade.py alone and import this file lazily).
"""

from __future__ import annotations

import re

_SPACING_RE = re.compile(r"\\left(?![A-Za-z])|\\right(?![A-Za-z])|\\[!,;: ]|~")


def normalize_answer(s: str) -> str:
    """Strip `$`, LaTeX spacing (`\\left`, `\\,`, `~`), `\\dfrac`/`\\tfrac` -> `\\frac`, spaces
    except one between word characters, and a trailing period."""
    s = _SPACING_RE.sub("", s.strip().strip("$"))
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
    s = re.sub(r"(?<=[A-Za-z0-9])\s+(?=[A-Za-z0-9])", " ", s)  # one space between word characters
    s = re.sub(r"(?<![A-Za-z0-9])\s+|\s+(?![A-Za-z0-9])", "", s)
    return s.rstrip(".")


def answer_key(text: str) -> str | None:
    """What a path's text agrees on: its last `\\boxed{}` (`tokens.last_boxed`) normalised, or
    None when it has no box or the box normalises to nothing."""
    from parathinker.spec.tokens import last_boxed

    boxed = last_boxed(text)
    return normalize_answer(boxed) or None if boxed is not None else None
