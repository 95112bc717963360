"""Stopping on agreement on the demo model (issue 23): path tokens saved and accuracy kept.

The first 24 held-out problems of the demo (docs/demo/, `parathinker.demo.task`: the split the
demo's eval reads, seed 0), P = 8 paths with the demo's budgets (`DemoConfig`), temperature 1, every
path waited for (min_finished_paths = 8), one seed per problem; run once in one batch through
LLM.generate without the rule and once with stop_on_agreement = 2, the same seeds. Reports the path
tokens of each run, the saving, the accuracy of each (the summary's answer, graded by the eval
grader), and checks that every request that stopped early holds >= 2 ended paths with the same
answer. Not a timing benchmark: the numbers are counts, deterministic for a given torch and CPU
kernel set (1 thread, as the demo pins).

    python bench/agreement.py
"""

from __future__ import annotations

import argparse
import random
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

from common import machine, report
from parathinker import LLM, SamplingParams
from parathinker.demo.config import DemoConfig
from parathinker.demo.task import split_problems
from parathinker.eval.grade import grade
from parathinker.spec.answers import normalize_answer

ROOT = Path(__file__).resolve().parents[1]


def stopped_early(out) -> bool:
    return any(p.finish_reason == "cut" for p in out.paths)


def agreeing(out) -> int:
    """The most ended paths ("end" or "budget") sharing one normalised answer."""
    keys = Counter(normalize_answer(p.answer) for p in out.paths
                   if p.finish_reason in ("end", "budget") and p.answer is not None)
    return max(keys.values(), default=0)


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--model", default=str(ROOT / "docs" / "demo" / "model"))
    ap.add_argument("--problems", type=int, default=24)
    ap.add_argument("--paths", type=int, default=8)
    ap.add_argument("--agree", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = DemoConfig()
    config = vars(args) | {"max_path_tokens": cfg.max_path_tokens, "temperature": cfg.temperature,
                           "max_summary_tokens": cfg.max_summary_tokens, "threads": 1}
    print("machine:", machine())
    print("config:", config)
    _, held_out = split_problems(random.Random(cfg.seed), cfg.num_held_out)
    problems = held_out[:args.problems]
    llm = LLM(args.model, device="cpu", dtype="float32")
    base = SamplingParams(num_paths=args.paths, max_path_tokens=cfg.max_path_tokens,
                          max_summary_tokens=cfg.max_summary_tokens,
                          min_finished_paths=args.paths, temperature=cfg.temperature, top_p=1.0)
    results = {}
    for name, params in (("all_paths", base), ("agreement", replace(base, stop_on_agreement=args.agree))):
        outs = []
        encoded = llm.encode_prompts([p["problem"] for p in problems], None)
        reqs = [llm.engine.add_request(f"{name}-{i}", ids, replace(params, seed=cfg.seed + i))
                for i, ids in enumerate(encoded)]
        llm.engine.run_to_completion()
        outs = [llm.request_output(r) for r in reqs]
        early = [o for o in outs if stopped_early(o)]
        results[name] = {
            "path_tokens": sum(o.num_path_tokens for o in outs),
            "correct": sum(grade(p["answer"], o.summary.text) for p, o in zip(problems, outs)),
            "stopped_early": len(early),
            "early_without_agreement": sum(agreeing(o) < args.agree for o in early),
        }
        print(name, results[name])
    saved = 1 - results["agreement"]["path_tokens"] / results["all_paths"]["path_tokens"]
    results["path_tokens_saved"] = round(saved, 4)
    results["accuracy_change"] = results["agreement"]["correct"] - results["all_paths"]["correct"]
    report("agreement", config, results)


if __name__ == "__main__":
    main()
