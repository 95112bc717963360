"""Decode step time with the graph path off and on (`engine.graphs`, LLM(compile=...)).

One request of P paths of exactly N tokens (plus a one-token summary), run by engines over the
same random weights in three modes:

    eager        compile off, the linear layers of --linear (auto: prepacked oneDNN on CPU float32)
    eager-plain  compile off, plain linear layers (what the compiled forward starts from)
    compiled     compile on: torch.compile'd decode per batch bucket (+ CUDA graphs on CUDA)

Each step is timed alone; a request's median step is its decode step (the prefill is one step
of N). Every mode runs the workload once to warm up (compiles, captures), then the modes run in
turn `--rounds` times; each keeps its fastest round.

    python bench/compile_step.py --model small --paths 1,8 --tokens 64
    python bench/compile_step.py --device cuda --dtype bfloat16 --model 1.5b --paths 1,8,16
"""

from __future__ import annotations

import argparse
import statistics

from common import DTYPES, add_model_flags, prompt_ids, random_model, report, start, synthetic_ctrl, timed
from parathinker.config import SamplingParams
from parathinker.engine import Engine
from parathinker.model.fast_linear import apply_linear_backend

MODES = ("eager", "eager-plain", "compiled")


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--tokens", type=int, default=64, help="N tokens per path")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--paths", default="1,8", help="comma list of P (the decode batch)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repeats; the fastest counts")
    add_model_flags(ap)
    ap.set_defaults(model="small")
    args = ap.parse_args()
    shape, config = start(args)
    ctrl, template = synthetic_ctrl(shape["vocab_size"])
    engines = {}
    for mode in MODES:
        model = random_model(shape, args.device, DTYPES[args.dtype])  # the same weights (seed 0)
        config[f"linear_{mode}"] = apply_linear_backend(model, args.linear if mode == "eager" else "plain")
        engines[mode] = Engine(model, ctrl, template, num_kv_blocks=1024, attention=args.attention,
                               compile=mode == "compiled")
    prompt = prompt_ids(args.prompt)
    paths = [int(x) for x in args.paths.split(",")]

    def run(mode: str, p: int) -> tuple[float, float]:
        """-> (median step, total) seconds."""
        engine = engines[mode]
        params = SamplingParams(num_paths=p, max_path_tokens=args.tokens, min_path_tokens=args.tokens,
                                min_finished_paths=p, max_summary_tokens=len(template) + 1,
                                temperature=0)
        req = engine.add_request(f"{mode}-{p}-{engine.num_steps}", prompt, params)
        steps = []
        while engine.has_unfinished():
            steps.append(timed(engine.step)[0])
        assert all(len(x.tokens) == args.tokens for x in req.paths)
        return statistics.median(steps), sum(steps)

    for mode in MODES:  # warm-up: every batch bucket and width this workload meets
        for p in paths:
            run(mode, p)
    best: dict[str, dict[int, tuple[float, float]]] = {m: {} for m in MODES}
    for r in range(args.rounds):
        for p in paths:
            for mode in MODES:
                got = run(mode, p)
                if p not in best[mode] or got[0] < best[mode][p][0]:
                    best[mode][p] = got
                print(f"round {r + 1}: P={p:2d} {mode:12s} step {got[0] * 1e3:7.2f} ms  "
                      f"total {got[1]:.2f} s", flush=True)
    results = {}
    for p in paths:
        step = {m: best[m][p][0] for m in MODES}
        print(f"P={p:2d}: " + "  ".join(f"{m} {s * 1e3:.2f} ms" for m, s in step.items())
              + f"  compiled/eager {step['compiled'] / step['eager']:.2f}x")
        results[p] = {"step_ms": {m: s * 1e3 for m, s in step.items()},
                      "total_s": {m: best[m][p][1] for m in MODES},
                      "compiled_vs_eager": step["compiled"] / step["eager"],
                      "compiled_vs_eager_plain": step["compiled"] / step["eager-plain"]}
    report("compile_step", config, results)


if __name__ == "__main__":
    main()
