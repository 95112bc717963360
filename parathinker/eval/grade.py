"""Grade a model response against a reference answer with math-verify, safely and with a time limit.

    from parathinker.eval import grade   # the function; `from parathinker.eval.grade import grade` too
    grade("\\frac{1}{2}", "... so the answer is $\\boxed{0.5}$")   # True

How a response is graded (`grade(gold, response)`):
1. the last complete `\\boxed{...}` / `\\fbox{...}` (or `\\boxed 5`) of the response is the answer
   (`parathinker.spec.tokens.last_boxed`, the extractor `RequestOutput.answer` uses too); without
   one, math-verify searches the whole response, as it does by default;
2. fast path: equal after light string normalisation -> True;
3. multiple choice: when the gold is a letter A-E (`C`, `(C)`, `\\text{(C)}`) and the boxed answer is or
   starts with one (`C`, `(C) 12`, `\\textbf{(C)}`, not `(C) or (D)`), or, without a box, the response's
   last `(C)` / `answer is C` gives one, the letters are compared (math-verify has no notion of choices);
4. otherwise `verify(parse(gold), parse(answer))` (gold first, as math-verify's authors recommend), with
   math-verify's signal-based timeouts off (`parsing_timeout=None`, `timeout_seconds=None`), because
   signal.alarm only works in the main thread.

Step 4 runs in a small pool of persistent worker processes (fresh interpreters that load only this file
and math-verify), so the time limit works from any thread: a worker that has not answered within
`timeout_s` is killed and the grading is False. Any error while grading is also False. A worker that
cannot start (math-verify missing) raises RuntimeError: a broken setup must not read as 0% accuracy.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_CHOICE_RE = re.compile(r"\(([A-E])\)|answer is:?\s*([A-E])\b")
_STARTUP_TIMEOUT_S = 120.0


def _normalize(s: str) -> str:
    """Light, lossless-for-grading normalisation used only for the equality fast path: the
    engine's agreement rule too, so it is stated once in `parathinker.spec.answers`."""
    # imported here: the grading workers load this file alone, without the package (and torch)
    from parathinker.spec.answers import normalize_answer

    return normalize_answer(s)


def _unwrap(s: str) -> str:
    prev = None
    while prev != s:
        prev, s = s, _WRAPPER_RE.sub(r"\1", s)
    return s.strip().strip("$").strip()


def _choice_letter(s: str, allow_prefix: bool) -> str | None:
    """`C`, `(C)`, `\\text{(C)}` -> "C"; with allow_prefix also `(C) 12`, `\\textbf{(C) }12`, not `(C) or (D)`."""
    s = _unwrap(s)
    m = re.fullmatch(r"\(?([A-E])\)?\.?", s)
    if m is None and allow_prefix:
        m = re.match(r"\(([A-E])\)", s)
        m = None if m is None or _CHOICE_RE.search(s, m.end()) else m
    return m.group(1) if m else None


def _choice_in_text(text: str) -> str | None:
    """For a response without a box: the letter of the last `(C)` or `answer is C`."""
    matches = list(_CHOICE_RE.finditer(_unwrap(text)))
    return (matches[-1].group(1) or matches[-1].group(2)) if matches else None


def _gold_text(gold: str) -> str:
    """The gold answer as math-verify should see it: boxed, so the whole string is one answer."""
    return gold if _BOX_RE.search(gold) else f"$\\boxed{{{gold.strip().strip('$')}}}$"


def verify_in_process(gold_text: str, pred_text: str) -> bool:
    """math-verify on the current thread, without any time limit (the slow twin of the worker path)."""
    from math_verify import parse, verify

    gold_parsed = parse(gold_text, parsing_timeout=None)  # type: ignore[arg-type]
    if not gold_parsed:
        return False
    pred_parsed = parse(pred_text, parsing_timeout=None)  # type: ignore[arg-type]
    return bool(pred_parsed) and bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def _serve() -> None:
    """Worker loop: one JSON line [gold_text, pred_text] in, one JSON line true/false out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business; it kills us
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints from sympy/antlr must not corrupt the protocol
    try:
        import logging

        import math_verify  # noqa: F401

        logging.disable(logging.CRITICAL)
        verify_in_process("$\\boxed{1}$", "$\\boxed{1}$")  # warm up sympy and the LaTeX parser
    except Exception as e:  # noqa: BLE001
        out.write(json.dumps({"ready": False, "error": repr(e)}) + "\n")
        return
    out.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        try:
            ok = verify_in_process(*json.loads(line))
        except Exception:  # noqa: BLE001 - a RecursionError or MemoryError is a wrong answer too
            ok = False
        out.write(json.dumps(ok) + "\n")


# Load this file under a private name in a fresh interpreter: no package __init__ (torch), no re-run of
# the caller's __main__ (as multiprocessing spawn would do), nothing inherited from a forked parent.
_WORKER_CODE = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('_parathinker_grade_worker', sys.argv[1])\n"
    "m = importlib.util.module_from_spec(spec); sys.modules[spec.name] = m\n"
    "spec.loader.exec_module(m); m._serve()\n"
)


class _Worker:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_CODE, os.path.abspath(__file__)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, encoding="utf-8",
        )
        line = self._readline(_STARTUP_TIMEOUT_S)
        status = json.loads(line) if line else {"ready": False, "error": "no answer from worker"}
        if not status.get("ready"):
            self.kill()
            raise RuntimeError(f"math-verify grading worker failed to start: {status.get('error')}")

    def _readline(self, timeout_s: float) -> str | None:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        return (self.proc.stdout.readline() or None) if ready else None

    def call(self, gold_text: str, pred_text: str, timeout_s: float) -> bool | None:
        """True/False, or None when the worker timed out or died (it must then be killed)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps([gold_text, pred_text]) + "\n")
        self.proc.stdin.flush()
        line = self._readline(timeout_s)
        return None if line is None else bool(json.loads(line))

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


class _Pool:
    """Up to max_workers persistent workers, checked out by one grading at a time."""

    def __init__(self, max_workers: int) -> None:
        self.max_workers = max_workers
        self.pid = os.getpid()
        self.idle: list[_Worker] = []
        self.num_workers = 0
        self.cond = threading.Condition()

    def run(self, gold_text: str, pred_text: str, timeout_s: float) -> bool:
        with self.cond:
            while not self.idle and self.num_workers >= self.max_workers:
                self.cond.wait()
            worker = self.idle.pop() if self.idle else None
            if worker is not None and worker.proc.poll() is not None:  # died while idle (OOM killer, ...)
                worker.kill()
                worker, self.num_workers = None, self.num_workers - 1
            if worker is None:
                self.num_workers += 1
        result: bool | None = None
        try:
            worker = worker or _Worker()  # started outside the lock: other graders keep going
            result = worker.call(gold_text, pred_text, timeout_s)
        except (OSError, ValueError):
            result = None
        finally:
            if result is None and worker is not None:
                worker.kill()
            with self.cond:
                if result is None:
                    self.num_workers -= 1
                else:
                    self.idle.append(worker)  # type: ignore[arg-type]
                self.cond.notify()
        return bool(result)

    def close(self) -> None:
        with self.cond:
            for w in self.idle:
                w.kill()
            self.num_workers -= len(self.idle)
            self.idle.clear()


_pool: _Pool | None = None
_pool_lock = threading.Lock()


def _get_pool() -> _Pool:
    global _pool
    with _pool_lock:
        if _pool is None or _pool.pid != os.getpid():  # a forked child must not share its parent's pipes
            _pool = _Pool(max(1, min(4, os.cpu_count() or 1)))
        return _pool


@atexit.register
def shutdown_workers() -> None:
    """Kill the idle grading workers (they are restarted on the next grade call)."""
    if _pool is not None and _pool.pid == os.getpid():
        _pool.close()


def grade(gold: str, response: str, timeout_s: float = 5.0) -> bool:
    """True when the response's final answer is equivalent to `gold`. Never raises on bad input."""
    # imported here: the grading workers load this file alone, without the package (and torch)
    from parathinker.spec.tokens import last_boxed

    try:
        boxed = last_boxed(response)
        answer = response if boxed is None else boxed
        if _normalize(answer) and _normalize(answer) == _normalize(gold):
            return True
        gold_letter = _choice_letter(gold, allow_prefix=False)
        letter = None
        if gold_letter:
            letter = _choice_in_text(response) if boxed is None else _choice_letter(boxed, allow_prefix=True)
        if gold_letter and letter:
            return letter == gold_letter
        pred_text = response if boxed is None else f"$\\boxed{{{boxed}}}$"
    except Exception:  # noqa: BLE001
        return False
    return _get_pool().run(_gold_text(gold), pred_text, timeout_s)


def majority_vote(
    answers: Sequence[str | None], use_grader: bool = True, timeout_s: float = 5.0,
    weights: Sequence[float | None] | None = None,
) -> str | None:
    """Most common answer, equivalent answers grouped; None answers are ignored.

    Answers are bare final answers (e.g. `parathinker.spec.tokens.last_boxed` output). Each answer joins
    the first earlier group whose first member (as gold) grades it correct, or with use_grader=False
    whose normalised string is equal. Deterministic: ties go to the group that appeared first.
    Returns that group's first member, or None when there is no answer. With `weights` (one per
    answer) a group's size is the sum of its members' weights (DeepConf's confidence-weighted vote:
    each path votes with its confidence); an answer without a weight (None) does not vote.
    """
    if weights is not None and len(weights) != len(answers):
        raise ValueError(f"{len(weights)} weights for {len(answers)} answers")
    groups: list[tuple[str, float]] = []  # (first member, votes) in order of first appearance
    for j, a in enumerate(answers):
        weight = 1.0 if weights is None else weights[j]
        if a is None or weight is None:
            continue
        for k, (rep, count) in enumerate(groups):
            same = grade(rep, f"\\boxed{{{a}}}", timeout_s) if use_grader else _normalize(rep) == _normalize(a)
            if same:
                groups[k] = (rep, count + weight)
                break
        else:
            groups.append((a, weight))
    if not groups:
        return None
    best = max(c for _, c in groups)
    return next(rep for rep, c in groups if c == best)
