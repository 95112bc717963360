"""The gating study (issue 23) on the demo model: accuracy against generated tokens at P = 8 for
first-finish, wait-for-all, stopping on agreement and confidence pruning.

    python -m parathinker.demo.gating --output docs/demo      # the committed study (GATING.md)

Every step is `parathinker eval` (printed before it runs; finished samples are kept, so a rerun
resumes) on the demo's held-out problems with the demo's eval settings (`DemoConfig`: its path
and summary budgets, temperature 1, seed 0: every configuration draws each problem's sample
from the same seed), path confidences over windows of `GatingStudy.window` tokens, one CPU thread:
1. wait-for-all (min_finished_paths = 8), and beside it stop_on_agreement = 1, 2, 3;
2. pruning at thresholds read off step 1: the `quantiles` of the ungated run's path confidences
   (a path whose confidence, its lowest group confidence, is below the q-quantile would be
   pruned, so about a fraction q of the paths is);
3. first-finish (min_finished_paths = 1).
Writes <output>/GATING.md (the table, the Pareto plot and the verdict, from the numbers),
gating_pareto.png and gating_summary.json; work files go to <output>/work/gating.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from parathinker.demo.config import DemoConfig
from parathinker.demo.pipeline import _run, float_environment, token_counter, torch_threads
from parathinker.demo.report import teacher_agreement_saving
from parathinker.demo.task import MODULUS, split_problems, write_jsonl
from parathinker.eval.report import mean_se_text, pareto_front, tokens_figure
from parathinker.spec.answers import normalize_answer

WAIT, FIRST = "wait-for-all", "first-finish"


@dataclass(frozen=True)
class GatingStudy:
    paths: int = 8
    window: int = 8  # tokens per group confidence (a demo path holds 14 to 90)
    top_k: int = 20
    agreements: tuple[int, ...] = (1, 2, 3)
    quantiles: tuple[float, ...] = (0.1, 0.25, 0.5)
    samples: int = 1
    limit: int | None = None  # the first N held-out problems; None: all of them


def eval_argv(study: GatingStudy, demo: DemoConfig, model: Path, data: Path, out: Path,
              *extra: str) -> list[str]:
    argv = ["eval", "--model", str(model), "--benchmark", "modeq", "--data", f"modeq={data}",
            "--mode", "parathinker", "--paths", str(study.paths), "--samples", str(study.samples),
            "--max-path-tokens", str(demo.max_path_tokens),
            "--max-summary-tokens", str(demo.max_summary_tokens),
            "--temperature", str(demo.temperature), "--top-p", "1.0", "--seed", str(demo.seed),
            "--device", "cpu", "--dtype", "float32", "--confidence-window", str(study.window),
            "--confidence-top-k", str(study.top_k), "--output", str(out), "--resume", *extra]
    return argv + (["--limit", str(study.limit)] if study.limit is not None else [])


def thresholds(records: list[dict[str, Any]], quantiles: tuple[float, ...]) -> list[float]:
    """The quantiles of the path confidences of the ungated records, rounded to 4 significant
    digits (so that the flags, the labels and the stored settings say the same number)."""
    values = [c for r in records if not r.get("stop_on_agreement") and r.get("prune_confidence") is None
              for c in r.get("path_confidences") or () if c is not None]
    if not values:
        raise ValueError("no path confidences in the ungated run: was --confidence-window set?")
    return [float(f"{np.quantile(values, q):.4g}") for q in quantiles]


def path_outcomes(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Over the ungated records' paths, split by whether a path boxed an answer: how many, their
    median length and mean confidence."""
    out = {}
    ungated = [r for r in records if not r.get("stop_on_agreement") and r.get("prune_confidence") is None]
    for name, boxed in (("answered", True), ("unanswered", False)):
        paths = [(t, c) for r in ungated for t, c, a in zip(r["path_tokens"], r["path_confidences"],
                                                            r["path_answers"]) if (a is not None) == boxed]
        out[name] = {"paths": len(paths), "median_tokens": float(np.median([t for t, _ in paths])),
                     "mean_confidence": float(np.mean([c for _, c in paths]))}
    return out


def agreement_cuts(records: list[dict[str, Any]], agree: int) -> dict[str, float]:
    """Over the records run with stop_on_agreement = `agree`: how many there are, how many stopped
    early (a path was cut), the median token at which they stopped (a cut path's length), and of
    those that stopped early, how many had `agree` ended paths with the same answer (the rule's
    reason to stop), how many summaries were wrong, and how many of those had `agree` ended paths
    boxing the gold answer."""
    runs = [r for r in records if r.get("stop_on_agreement") == agree and r.get("prune_confidence") is None]
    early = [r for r in runs if "cut" in r["path_finish"]]
    cuts = [max(t for t, f in zip(r["path_tokens"], r["path_finish"]) if f == "cut") for r in early]
    wrong = [r for r in early if not r["correct"]]
    gold = [r for r in wrong if sum(a == r["gold"] and f != "cut"
                                    for a, f in zip(r["path_answers"], r["path_finish"])) >= agree]
    agreed = [r for r in early if max(Counter(normalize_answer(a) for a, f in zip(r["path_answers"], r["path_finish"])
                                              if a is not None and f != "cut").values(), default=0) >= agree]
    return {"requests": len(runs), "early": len(early), "median_cut": float(np.median(cuts)) if cuts else 0.0,
            "early_agreed": len(agreed), "early_wrong": len(wrong), "early_wrong_paths_agreed_on_gold": len(gold)}


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def configurations(wait: dict[str, Any], first: dict[str, Any], num_paths: int) -> dict[str, Any]:
    """One summary per configuration (eval's stats), by the study's names."""
    base = f"P={num_paths}"
    out = {f"{base} {FIRST}": first[base], f"{base} {WAIT}": wait[base]}
    out.update((label, s) for label, s in wait.items() if label != base)
    return out


def _correct(records: list[dict[str, Any]]) -> dict[tuple[int, float | None], dict[str, float]]:
    out: dict[tuple[int, float | None], dict[str, float]] = {}
    for r in records:
        gate = (int(r.get("stop_on_agreement") or 0), r.get("prune_confidence"))
        out.setdefault(gate, {})[f"{r['id']}/{r['sample']}"] = float(r["correct"])
    return out


def rows(configs: dict[str, Any], wait_records: list[dict[str, Any]],
         first_records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration: accuracy, votes, tokens per problem, the path tokens saved against
    wait-for-all and the samples it got right and wrong that wait-for-all did not."""
    by_gate = _correct(wait_records)
    ref, ref_tokens = by_gate[(0, None)], configs[next(k for k in configs if WAIT in k)]["tokens_per_problem"]
    out = []
    for label, s in configs.items():
        mine = _correct(first_records)[(0, None)] if FIRST in label else \
            by_gate[(s.get("stop_on_agreement", 0), s.get("prune_confidence"))]
        tok = s["tokens_per_problem"]
        out.append({"configuration": label, "accuracy": s["accuracy"], "accuracy_se": s["accuracy_se"],
                    "majority": s.get("majority_accuracy"),
                    "confidence_majority": s.get("confidence_majority_accuracy"),
                    "path_tokens": tok["paths"], "summary_tokens": tok["summary"], "total_tokens": tok["total"],
                    "path_tokens_saved": 1 - tok["paths"] / ref_tokens["paths"],
                    "gained": sum(mine[k] > ref[k] for k in ref), "lost": sum(mine[k] < ref[k] for k in ref),
                    "num_samples": len(ref)})
    return out


def verdict(table: list[dict[str, Any]], agreement: int = 2) -> list[str]:
    """What the numbers say, sentence by sentence (the page's "Verdict")."""
    by = {r["configuration"]: r for r in table}
    front = pareto_front([(r["total_tokens"], r["accuracy"]) for r in table])
    lines = ["Pareto-efficient (no other configuration is as accurate for fewer tokens): "
             + ", ".join(table[i]["configuration"] for i in front) + "."]
    for r in table:
        if WAIT in r["configuration"]:
            continue
        lines.append(f"{r['configuration']}: {100 * r['path_tokens_saved']:+.1f} % path tokens saved against "
                     f"wait-for-all, accuracy {100 * r['accuracy']:.1f} % (+{r['gained']} / -{r['lost']} "
                     f"of {r['num_samples']} samples against wait-for-all).")
    agree = next((r for label, r in by.items() if f"agree={agreement}" in label and "prune" not in label), None)
    if agree is not None:
        saved, net = agree["path_tokens_saved"], agree["gained"] - agree["lost"]
        holds = saved >= 0.2 and net >= -max(1, round(agree["num_samples"] / 24))
        lines.append(f"The issue's criterion (stop_on_agreement={agreement} saves >= 20 % of path tokens with "
                     f"accuracy within 1 problem in 24): {'holds' if holds else 'does not hold'} here "
                     f"({100 * saved:.1f} % saved, net {net:+d} of {agree['num_samples']} samples).")
    return lines


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def render(study: GatingStudy, demo: DemoConfig, table: list[dict[str, Any]], cuts: list[float],
           lines: list[str], env: dict[str, Any], num_problems: int,
           outcomes: dict[str, dict[str, float]], cut: dict[str, float], teacher: float) -> str:
    a, u = outcomes["answered"], outcomes["unanswered"]
    answered = a["paths"] / (a["paths"] + u["paths"])
    cmd = "python -m parathinker.demo.gating --output docs/demo"
    head = ["# Gated thinking on the demo model: accuracy against generated tokens", "",
            "Regenerate (the demo's model/ must be there; resumes from docs/demo/work/gating):", "",
            "```bash", cmd, "```", "",
            f"`parathinker eval` at P = {study.paths} on the demo's {num_problems} held-out problems, "
            f"{study.samples} sample(s) each from the same seeds in every configuration (the demo's settings: "
            f"paths of at most {demo.max_path_tokens} tokens, summaries of {demo.max_summary_tokens}, "
            f"temperature {demo.temperature:g}), path confidences over windows of "
            f"{study.window} tokens (top-{study.top_k} log-probabilities), one CPU thread "
            f"(torch {env['torch']}, {env['cpu_capability']} kernels). Wait-for-all waits for every path "
            "(min_finished_paths = 8), first-finish for one; `agree=k` is wait-for-all with "
            f"stop_on_agreement = k; `prune<c` prunes at the {', '.join(f'{q:g}' for q in study.quantiles)} "
            f"quantiles of the wait-for-all run's path confidences ({', '.join(f'{c:g}' for c in cuts)}). "
            "Tokens are per problem, the summary's forced template included.", "",
            "| configuration | accuracy % | path majority % | confidence-weighted majority % | path tokens "
            "| summary tokens | total tokens | path tokens saved | +/- samples vs wait-for-all |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    body = [f"| {r['configuration']} | {mean_se_text(r['accuracy'], r['accuracy_se'])} | {_pct(r['majority'])} "
            f"| {_pct(r['confidence_majority'])} | {r['path_tokens']:.1f} | {r['summary_tokens']:.1f} "
            f"| {r['total_tokens']:.1f} | {100 * r['path_tokens_saved']:.1f} % | +{r['gained']} / -{r['lost']} |"
            for r in table]
    tail = ["", "![accuracy against generated tokens per problem](gating_pareto.png)", "", "## Verdict", "",
            *(f"- {line}" for line in lines), "",
            "How the task shapes these numbers: a path of the demo task stops as soon as it verifies a "
            f"candidate ({a['paths']} of the wait-for-all run's paths boxed an answer, after "
            f"{a['median_tokens']:.0f} tokens at the median) and otherwise runs through its {demo.tries} "
            f"tries to `not found.` ({u['paths']} paths, {u['median_tokens']:.0f} tokens at the median, no "
            "answer), so a path that ends early nearly always carries a verified answer: stopping on "
            "the first answer (`agree=1`) then behaves like first-finish, and stopping on two "
            f"(`agree=2`) cuts the paths still thinking when a second path has verified x ({cut['early']} "
            f"of {cut['requests']} requests stopped early, at token {cut['median_cut']:.0f} at the median, "
            f"of a {demo.max_path_tokens}-token budget; {cut['early_agreed']} of them with two ended paths "
            "giving the same answer). "
            + (f"Of those, {cut['early_wrong']} summaries were wrong, {cut['early_wrong_paths_agreed_on_gold']} "
               "of them after two ended paths had boxed the right answer (the path majority column counts "
               "those as right). " if cut["early_wrong"] else "None of their summaries was wrong. ")
            + "The summary reads paths cut mid-step: the teacher writes "
            f"{100 * demo.agreement_share:.0f}% of its samples as stopping on 2 or 3 agreeing answers "
            "would leave them (`parathinker.demo.task.agreement_cut`; "
            "trained on whole paths only, it had lost 28 of 99 samples here: README.md, \"What did not "
            "work first\", 6.). The "
            f"scripted teacher's own paths, cut the same way, save {100 * teacher:.1f} % of their path tokens (what a perfect imitation would save, "
            "`parathinker.demo.report.teacher_agreement_saving`); the model's paths boxed an answer in "
            f"{100 * answered:.0f} % of cases, where the teacher's find x in "
            f"{100 * demo.tries / (MODULUS - 1):.0f} % ({demo.tries} tries of {MODULUS - 1} candidates). "
            "Confidence hardly separates the paths that verified the answer from those that "
            f"did not (mean {a['mean_confidence']:.3f} and {u['mean_confidence']:.3f}): the candidates "
            "a path tries are drawn at random (the teacher picks them so, and the model learned to), "
            "so their tokens are uncertain in every path, and pruning the least confident paths "
            "removes paths that would have verified the answer too (see the path majority column). "
            "DeepConf's premise (low confidence flags a wrong trace) needs reasoning whose uncertain "
            "steps are its mistakes; on this task they are its search.", "",
            "Accuracy is the summary's answer; the majority columns vote over the paths' own answers "
            "(confidence-weighted: DeepConf's, each path's answer weighs its confidence). `+/-` counts "
            "the samples a configuration got right (+) or wrong (-) where wait-for-all did not, on the "
            "same seeds. Numbers: `gating_summary.json`; every sample: work/gating/*/samples.jsonl.", ""]
    return "\n".join(head + body + tail)


def run_study(study: GatingStudy, output: Path, demo: DemoConfig = DemoConfig(), log: Any = print
              ) -> list[str]:
    with torch_threads(demo.threads):
        return _run_study(study, output, demo, log)


def _run_study(study: GatingStudy, output: Path, demo: DemoConfig, log: Any) -> list[str]:
    work, model = output / "work" / "gating", output / "model"
    if not (model / "model.safetensors").exists():
        raise FileNotFoundError(f"{model}: no demo model (run `python -m parathinker.demo --output {output}`)")
    data = work / "eval.jsonl"
    if not data.exists():  # the demo's held-out problems, as `parathinker.demo.task.build` splits them
        write_jsonl(data, split_problems(random.Random(demo.seed), demo.num_held_out)[1])
    wait, first = work / "wait", work / "first"
    p = str(study.paths)
    _run(eval_argv(study, demo, model, data, wait, "--min-finished-paths", p, "--stop-on-agreement",
                   ",".join(map(str, (0, *study.agreements)))), log)
    cuts = thresholds(_jsonl(wait / "samples.jsonl"), study.quantiles)
    _run(eval_argv(study, demo, model, data, wait, "--min-finished-paths", p, "--prune-confidence",
                   ",".join(["none", *map(str, cuts)])), log)
    _run(eval_argv(study, demo, model, data, first, "--min-finished-paths", "1"), log)
    summaries = [json.loads((d / "summary.json").read_text())["summary"]["modeq"] for d in (wait, first)]
    configs = configurations(*summaries, study.paths)
    table = rows(configs, _jsonl(wait / "samples.jsonl"), _jsonl(first / "samples.jsonl"))
    lines = verdict(table)
    outcomes = path_outcomes(_jsonl(wait / "samples.jsonl"))
    cut = agreement_cuts(_jsonl(wait / "samples.jsonl"), 2)
    problems = _jsonl(data)[:study.limit]
    teacher = teacher_agreement_saving(problems, demo.tries, token_counter(model), num_paths=study.paths)
    env = float_environment()
    num_problems = configs[f"P={study.paths} {WAIT}"]["num_problems"]
    page = render(study, demo, table, cuts, lines, env, num_problems, outcomes, cut, teacher)
    (output / "GATING.md").write_text(page)
    tokens_figure({"modeq": configs}).savefig(output / "gating_pareto.png", dpi=120, bbox_inches="tight")
    (output / "gating_summary.json").write_text(json.dumps(
        {"study": asdict(study), "thresholds": cuts, "table": table, "verdict": lines, "paths": outcomes,
         "agreement_cuts": cut, "teacher_agreement_saving": teacher, "environment": env}, indent=1) + "\n")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parathinker.demo.gating", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    ap.add_argument("--output", default="docs/demo",
                    help="the demo's directory (its model/ is evaluated; GATING.md goes there)")
    ap.add_argument("--limit", type=int, default=None, help="the first N held-out problems (default: all)")
    args = ap.parse_args(argv)
    for line in run_study(GatingStudy(limit=args.limit), Path(args.output)):
        print(line)
    print(f"report: {Path(args.output) / 'GATING.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
