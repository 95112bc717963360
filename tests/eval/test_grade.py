"""Tests for parathinker.eval.grade: a table of (gold, response, expected), boxes, threads, time limit."""

from __future__ import annotations

import multiprocessing
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("math_verify")

from parathinker.eval.grade import _get_pool, grade, majority_vote, verify_in_process
from parathinker.spec.tokens import last_boxed

B = "\\boxed"
CASES = [
    # fractions, decimals, LaTeX forms
    ("\\frac{1}{2}", f"so the answer is ${B}{{0.5}}$.", True),
    ("0.5", f"${B}{{\\frac{{1}}{{2}}}}$", True),
    ("\\dfrac{17}{50}", f"{B}{{\\frac{{17}}{{50}}}}", True),
    ("\\dfrac{17}{50}", f"{B}{{0.34}}", True),
    ("\\frac43", f"{B}{{\\dfrac{{4}}{{3}}}}", True),
    ("\\frac 59", f"{B}{{5/9}}", True),
    ("1\\frac{4}{5}", f"{B}{{\\frac{{9}}{{5}}}}", True),
    (".0000672", f"{B}{{6.72\\times 10^{{-5}}}}", True),
    ("\\frac{1}{3}", f"{B}{{0.333}}", False),  # 3 digits is not 1/3 at math-verify's 6-digit rounding
    ("\\frac{1}{3}", f"{B}{{0.3333333}}", True),
    # thousands separators
    ("1080", f"{B}{{1,080}}", True),
    ("1,080", f"{B}{{1080}}", True),
    ("10,\\!080", f"{B}{{10080}}", True),
    ("10,\\!080", f"{B}{{10{{,}}080}}", True),
    ("\\$32,\\!348", f"{B}{{32348}}", True),
    # percentages, degrees, units
    ("10\\%", f"{B}{{10}}", True),
    ("10", f"{B}{{10\\%}}", True),
    ("30^\\circ", f"{B}{{30}}", True),
    ("30", f"{B}{{30^\\circ}}", True),
    ("90^\\circ", f"{B}{{90^{{\\circ}}}}", True),
    ("864 \\mbox{ inches}^2", f"{B}{{864}}", True),
    ("5.4 \\text{ cents}", f"{B}{{5.4}}", True),
    # intervals, sets, tuples
    ("(1, 2]", f"{B}{{(1,2]}}", True),
    ("(1, 2]", f"{B}{{[1,2)}}", False),
    ("(-\\infty, 0]", f"{B}{{(-\\infty,0]}}", True),
    ("(0,9) \\cup (9,36)", f"{B}{{(0,9)\\cup(9,36)}}", True),
    ("\\{1,2\\}", f"{B}{{\\{{2,1\\}}}}", True),
    ("\\{1,2\\}", f"{B}{{\\{{1,3\\}}}}", False),
    ("(1,2)", f"{B}{{(1,2)}}", True),
    ("(1,2)", f"{B}{{(2,1)}}", False),
    ("(6,31,-1)", f"{B}{{(6, -1, 31)}}", False),
    ("3, 5, 7", f"{B}{{7,5,3}}", True),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", f"{B}{{\\left(3, \\frac{{\\pi}}{{2}}\\right)}}", True),
    # multiple choice (own handling around math-verify) and text answers
    ("\\text{(C)}", f"{B}{{C}}", True),
    ("\\text{(C)}", f"{B}{{(C)}}", True),
    ("\\text{(C)}", f"{B}{{\\textbf{{(C) }}12}}", True),
    ("\\text{(C)}", f"{B}{{D}}", False),
    ("\\text{(C)}", f"{B}{{\\text{{(C) and (D)}}}}", False),
    ("\\text{(C)}", "The answer is (C).", True),
    ("\\text{(C)}", "(C) is wrong, so the answer is (D).", False),
    ("C", "So the answer is C.", True),
    ("\\text{Evelyn}", f"{B}{{\\text{{Evelyn}}}}", True),
    ("\\text{Evelyn}", f"{B}{{Evelyn}}", True),
    ("\\text{Evelyn}", f"{B}{{\\text{{Bob}}}}", False),
    ("\\text{east}", f"{B}{{\\text{{East}}}}", True),
    # roots, pi, negatives, algebra, matrices
    ("\\sqrt{2}/2", f"{B}{{\\frac{{\\sqrt2}}{{2}}}}", True),
    ("\\frac{\\sqrt{3}}{3}", f"{B}{{\\frac{{1}}{{\\sqrt{{3}}}}}}", True),
    ("2\\pi", f"{B}{{2 \\pi}}", True),
    ("2\\pi", f"{B}{{\\pi}}", False),
    ("-5", f"{B}{{-5}}", True),
    ("-5", f"{B}{{5}}", False),
    ("-\\frac{35}{9}", f"{B}{{-35/9}}", True),
    ("6 - 5i", f"{B}{{6-5i}}", True),
    ("(a+5)(b+2)", f"{B}{{ab+2a+5b+10}}", True),
    ("1 \\pm \\sqrt{19}", f"{B}{{1\\pm\\sqrt{{19}}}}", True),
    ("x=5", f"{B}{{5}}", True),
    ("\\begin{pmatrix} -1/3 \\\\ 2/3 \\end{pmatrix}",
     f"{B}{{\\begin{{pmatrix}} -\\frac13 \\\\ \\frac23 \\end{{pmatrix}}}}", True),
    # which box counts, box forms, no box, garbage
    ("3", f"so x = 2, {B}{{2}}. Wait, I made an error: {B}{{3}}.", True),
    ("3", f"first {B}{{3}} then {B}{{2}}", False),
    ("204", f"{B} 204", True),
    ("204", "\\fbox{204}", True),
    ("7", f"{B}{{7}} and a truncated {B}{{8", True),
    ("3", "The answer is 3.", True),
    ("3", "The answer is 4.", False),
    ("3", f"{B}{{", False),
    ("3", "}}}}{{{{\\\\\\frac", False),
    ("3", "", False),
    ("3", f"{B}{{}}", False),
]


@pytest.mark.parametrize("gold,response,expected", CASES)
def test_grade_table(gold: str, response: str, expected: bool) -> None:
    assert grade(gold, response) is expected


def test_table_is_large() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize("gold,response,expected", [c for c in CASES if "\\boxed" in c[1]][:12])
def test_worker_matches_in_process(gold: str, response: str, expected: bool) -> None:
    # the slow twin: math-verify on this thread, same inputs as the worker path
    box = last_boxed(response)
    assert verify_in_process(f"$\\boxed{{{gold}}}$", f"$\\boxed{{{box}}}$") is expected


def test_thread_pool_executor() -> None:
    golds = [str(i) for i in range(40)]
    responses = [f"\\boxed{{\\frac{{{2 * i}}}{{2}}}}" if i % 3 else f"\\boxed{{{i + 1}}}" for i in range(40)]
    with ThreadPoolExecutor(max_workers=6) as ex:
        got = list(ex.map(grade, golds, responses))
    assert got == [bool(i % 3) for i in range(40)]


def test_time_limit_in_non_main_thread() -> None:
    assert grade("2", "\\boxed{2.0}")  # warm a worker so the timing below is the limit alone
    result: list[tuple[bool, float]] = []

    def run() -> None:
        t0 = time.perf_counter()
        ok = grade("2", "\\boxed{10^{10^{10}}}", timeout_s=1.0)  # sympy would compute 10**(10**10)
        result.append((ok, time.perf_counter() - t0))

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=30)
    assert result and result[0][0] is False
    assert result[0][1] < 3.0
    assert grade("1/2", "\\boxed{0.5}")  # the pool recovers after killing the worker


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_forked_child_gets_its_own_workers() -> None:
    assert grade("1", "\\boxed{1.0}")  # the parent's pool is warm before the fork
    with multiprocessing.get_context("fork").Pool(1) as p:
        assert p.starmap(grade, [("1/2", "\\boxed{0.5}"), ("1/2", "\\boxed{0.6}")]) == [True, False]
    assert grade("1/2", "\\boxed{0.5}")  # and still works


def test_dead_idle_worker_is_replaced() -> None:
    assert grade("1/2", "\\boxed{0.5}")
    pool = _get_pool()
    with pool.cond:
        for w in pool.idle:
            w.proc.kill()
            w.proc.wait()
    assert grade("1/2", "\\boxed{0.5}")


def test_200_gradings_are_fast() -> None:
    grade("1/3", "\\boxed{2/6}")
    t0 = time.perf_counter()
    got = [grade(f"\\frac{{{i}}}{{7}}", f"\\boxed{{{i}/7}}") for i in range(200)]
    assert all(got) and time.perf_counter() - t0 < 10.0


def test_majority_vote() -> None:
    assert majority_vote(["1/2", "3", "0.5", "3", None, "\\frac12"]) == "1/2"  # {1/2, 0.5, \frac12} wins
    assert majority_vote(["4", "5", "5", "4"]) == "4"  # tie: first group seen
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None
    assert majority_vote(["0.5", "1/2", "7"], use_grader=False) == "0.5"  # string groups: all tie
    assert majority_vote(["\\dfrac{1}{2}", "7", "\\frac{1}{2}"], use_grader=False) == "\\dfrac{1}{2}"
