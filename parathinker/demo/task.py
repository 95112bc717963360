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

Gated thinking (`stop_on_agreement`) closes the paths still running when enough ended paths agree,
mid-step; a summary trained on whole paths only misread such paths (docs/demo/GATING.md). So a
share of the samples is written as stop_on_agreement = 2 or 3 would leave them (`agreement_cut`),
the cut paths marked `cut` (the training data's extension, docs/TRAINING.md).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from parathinker.train.data import parse_sample, write_samples

MODULUS = 13
AGREEMENTS = (2, 3)  # the stop_on_agreement values a cut sample is written under, equally often

# The pieces GPT-2's byte-level pre-tokenizer splits this task's (ASCII) text into. The demo's BPE,
# trained on the task's text with room to spare (DemoConfig.vocab_size), makes one token of each
# (tests/demo: on every teacher path), so a piece is the unit the engine decodes, one per step.
_PIECE = re.compile(r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")


def pieces(text: str) -> list[str]:
    """The text's tokens under the demo tokenizer (see _PIECE); they join back into the text."""
    return _PIECE.findall(text)


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


def agreement_cut(paths: list[str], found: list[bool], agree: int) -> tuple[list[str], list[bool]]:
    """The paths as stop_on_agreement = `agree` (with every path waited for) leaves them, and
    which were cut. In lock-step decoding (SPEC §5.3) a path of n tokens draws its end tag at step
    n + 1; every path that boxes an answer boxes the verified x, so any two agree. When the
    `agree`-th answering path ends (n = T), each path still running keeps the token it drew in that
    step, T + 1 tokens in all, and is closed (SPEC §5.4, finish reason "cut"). Fewer answers:
    nothing is cut."""
    split = [pieces(p) for p in paths]
    ends = sorted(len(s) for s, ok in zip(split, found) if ok)
    if agree < 1 or len(ends) < agree:
        return list(paths), [False] * len(paths)
    stop = ends[agree - 1]
    cut = [len(s) > stop for s in split]
    return ["".join(s[:stop + 1]) if c else p for s, c, p in zip(split, cut, paths)], cut


def teacher_sample(problem: dict[str, Any], num_paths: int, rng: random.Random,
                   tries: int, agree: int = 0) -> dict[str, Any]:
    """A training sample in the project's data format: question, paths, summary; with `agree`,
    its paths as stop_on_agreement = agree leaves them (`agreement_cut`, "cut" when any is)."""
    paths, ruled_out, found = [], set(), []
    for _ in range(num_paths):
        text, out, ok = teacher_path(problem, rng, tries)
        paths.append(text)
        ruled_out |= out
        found.append(ok)
    if any(found):
        answer = problem["answer"]
    else:  # no path verified it: guess among the candidates no path ruled out
        answer = str(rng.choice([x for x in range(1, problem["modulus"]) if x not in ruled_out]))
    sample: dict[str, Any] = {"question": problem["problem"], "paths": paths,
                              "summary": f" \\boxed{{{answer}}}."}
    paths, cut = agreement_cut(paths, found, agree)
    if any(cut):
        sample.update(paths=paths, cut=cut)
    return sample


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:  # the held-out problems
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def build(out_dir: Path, seed: int, num_train: int, tries: int, num_held_out: int = 99,
          max_train_paths: int = 8, agreement_share: float = 0.0) -> dict[str, Path]:
    """Teacher-written training samples (problems drawn from the training split, P from
    1..max_train_paths) and the held-out problems, one record each. A share `agreement_share`
    of the samples is written under stop_on_agreement = one of AGREEMENTS (drawn from its own
    random stream: the paths and summaries are those of a run without it)."""
    rng, cut_rng = random.Random(seed), random.Random(f"agreement-{seed}")
    problems, held_out = split_problems(rng, num_held_out)
    agree = lambda: cut_rng.choice(AGREEMENTS) if cut_rng.random() < agreement_share else 0  # noqa: E731
    train = [teacher_sample(rng.choice(problems), rng.randint(1, max_train_paths), rng, tries, agree())
             for _ in range(num_train)]
    files = {"train": out_dir / "train.jsonl", "eval": out_dir / "eval.jsonl"}
    write_samples(files["train"], [parse_sample(t, f"teacher sample {i}") for i, t in enumerate(train)])
    write_jsonl(files["eval"], held_out)
    return files
