"""A guess-and-check task where thinking wider helps, and a scripted teacher for it.

A problem asks for the x in 1..m-1 with a·x + c = b modulo a prime m (m = 13: exactly one x):

    Solve 5x + 4 = 7 modulo 13.

One reasoning path may check only `tries` candidates (a fixed per-path budget): it picks them at
random, computes each one's a·x and then a·x + c, writes b beside the result, and stops at the
first that gives b or after its last miss:

    5*3 2 + 4 6, 7 no 3. 5*4 7 + 4 11, 7 no 4. 5*11 3 + 4 7, 7 yes 11. \\boxed{11}

One path finds x with probability tries/(m-1); P independent paths with about
1 - (1 - tries/(m-1))^P, and a summary that reads every path can report the one that verified it.
The teacher writes paths exactly so, and a summary that states the verified answer (or, when no
path found it, a guess among the candidates no path ruled out).

Every token of a path is determined by the problem except the candidates: a, c and b are copied
from the prompt, the products and sums are two small tables the model learns, and the check is a
comparison of neighbouring tokens. Each verdict repeats its candidate (`no 3`, `yes 11`): the
copy the boxed answer needs is then made at every step, not once per path, and is learned in time.
There are 11·12·13 = 1716 problems, so that answers cannot be
memorised (with 132 problems, a·x = b alone, the model learned each training problem's answer and
boxed it on held-out problems whatever its paths found: see docs/demo/README.md).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from parathinker.train.data import parse_sample, write_samples

MODULUS = 13


def make_problem(a: int, b: int, c: int, modulus: int = MODULUS) -> dict[str, Any]:
    x = next(x for x in range(1, modulus) if (a * x + c) % modulus == b)
    return {"id": f"modeq-{a}-{c}-{b}", "problem": f"Solve {a}x + {c} = {b} modulo {modulus}.",
            "answer": str(x), "a": a, "b": b, "c": c, "modulus": modulus}


def all_problems(modulus: int = MODULUS) -> list[dict[str, Any]]:
    """Every (a, c, b) with a in 2..m-1, c in 0..m-1 and a solution x in 1..m-1."""
    return [make_problem(a, b, c, modulus) for a in range(2, modulus) for c in range(modulus)
            for b in range(modulus) if b != c % modulus]


def split_problems(rng: random.Random, num_held_out: int,
                   modulus: int = MODULUS) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training problems, held-out problems): the held-out ones are never trained on."""
    problems = all_problems(modulus)
    rng.shuffle(problems)
    return problems[num_held_out:], problems[:num_held_out]


def teacher_path(problem: dict[str, Any], rng: random.Random, tries: int) -> tuple[str, set[int], bool]:
    """One path: random candidates, each checked; returns (text, candidates ruled out, found)."""
    a, b, c, m = problem["a"], problem["b"], problem["c"], problem["modulus"]
    steps, ruled_out = [], set()
    for x in rng.sample(range(1, m), min(tries, m - 1)):
        r = a * x % m
        s = (r + c) % m
        step = f"{a}*{x} {r} + {c} {s}, {b}"
        if s == b:
            steps.append(f"{step} yes {x}. \\boxed{{{x}}}")
            return " " + " ".join(steps), ruled_out, True
        steps.append(f"{step} no {x}.")
        ruled_out.add(x)
    steps.append("not found.")
    return " " + " ".join(steps), ruled_out, False


def teacher_sample(problem: dict[str, Any], num_paths: int, rng: random.Random,
                   tries: int) -> dict[str, Any]:
    """A training sample in the project's data format: question, paths, summary."""
    paths, ruled_out, found = [], set(), False
    for _ in range(num_paths):
        text, out, ok = teacher_path(problem, rng, tries)
        paths.append(text)
        ruled_out |= out
        found |= ok
    if found:
        answer = problem["answer"]
    else:  # no path verified it: guess among the candidates no path ruled out
        answer = str(rng.choice([x for x in range(1, problem["modulus"]) if x not in ruled_out]))
    return {"question": problem["problem"], "paths": paths, "summary": f" \\boxed{{{answer}}}."}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:  # the held-out problems
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def build(out_dir: Path, seed: int, num_train: int, tries: int, num_held_out: int = 99,
          max_train_paths: int = 8) -> dict[str, Path]:
    """Teacher-written training samples (problems drawn from the training split, P from
    1..max_train_paths) and the held-out problems, one record each."""
    rng = random.Random(seed)
    problems, held_out = split_problems(rng, num_held_out)
    train = [teacher_sample(rng.choice(problems), rng.randint(1, max_train_paths), rng, tries)
             for _ in range(num_train)]
    files = {"train": out_dir / "train.jsonl", "eval": out_dir / "eval.jsonl"}
    write_samples(files["train"], [parse_sample(t, f"teacher sample {i}") for i, t in enumerate(train)])
    write_jsonl(files["eval"], held_out)
    return files
