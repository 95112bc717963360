"""One decode step with the graph path off and on (`engine.graphs`, LLM(compile=...)).

P paths decode one token each over a prompt of --prompt tokens and --context tokens of their own
(written by an eager prefill), through model runners over the same random weights:

    eager        compile off, the linear layers of --linear (auto: prepacked oneDNN on CPU float32)
    eager-plain  compile off, plain linear layers (what the compiled forward starts from)
    compiled     compile on: torch.compile'd decode (+ CUDA graphs on CUDA)

Each mode is warmed up (compile, capture), then the modes alternate step by step `--steps`
times (the same load on each, on a noisy machine) and each reports its median step.

    python bench/compile_step.py --model small --paths 1,8
    python bench/compile_step.py --device cuda --dtype bfloat16 --model 1.5b --paths 1,8,16
"""

from __future__ import annotations

import argparse
import statistics

from common import DTYPES, add_model_flags, random_model, report, start, timed
from parathinker.engine.request import SeqWork
from parathinker.engine.runner import ModelRunner
from parathinker.model.fast_linear import apply_linear_backend

MODES = ("eager", "eager-plain", "compiled")


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--context", type=int, default=256, help="tokens of each path so far")
    ap.add_argument("--paths", default="1,8", help="comma list of P (the decode batch)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per mode, alternating")
    add_model_flags(ap)
    ap.set_defaults(model="small")
    args = ap.parse_args()
    shape, config = start(args)
    paths = [int(x) for x in args.paths.split(",")]
    lp, n, block = args.prompt, args.context, 16
    stride = -(-(n + 1) // block) * block  # each path's own slots, past the prompt's
    num_blocks = (lp + max(paths) * stride) // block + 2
    runners = {}
    for mode in MODES:
        model = random_model(shape, args.device, DTYPES[args.dtype])  # the same weights (seed 0)
        config[f"linear_{mode}"] = apply_linear_backend(model, args.linear if mode == "eager" else "plain")
        runners[mode] = ModelRunner(model, num_blocks, block, args.attention, mode == "compiled")
    config["attention"] = runners["eager"].attention

    def path_ctx(k: int, length: int) -> list[tuple[int, int]]:
        return [(0, lp), (lp + k * stride, length)]

    prefill = [SeqWork(list(range(100, 100 + lp)), list(range(lp)), 0, [(0, lp)], False, None)]
    prefill += [SeqWork([200 + k] * n, list(range(lp, lp + n)), k + 1, path_ctx(k, n), False, None)
                for k in range(max(paths))]
    decode = {p: [SeqWork([300 + k], [lp + n], k + 1, path_ctx(k, n + 1), True, None)
                  for k in range(p)] for p in paths}
    for runner in runners.values():
        runner.run(prefill)
        for p in paths:
            for _ in range(3):
                runner.run(decode[p])  # warm-up: compile, capture
    assert all(runners["compiled"].graphs.takes(decode[p]) for p in paths)
    results = {}
    for p in paths:
        times: dict[str, list[float]] = {m: [] for m in MODES}
        for _ in range(args.steps):
            for mode, runner in runners.items():
                times[mode].append(timed(lambda: runner.run(decode[p]))[0])
        step = {m: statistics.median(ts) for m, ts in times.items()}
        print(f"P={p:2d}: " + "  ".join(f"{m} {s * 1e3:.2f} ms" for m, s in step.items())
              + f"  compiled/eager {step['compiled'] / step['eager']:.2f}x", flush=True)
        results[p] = {"step_ms": {m: s * 1e3 for m, s in step.items()},
                      "compiled_vs_eager": step["compiled"] / step["eager"],
                      "compiled_vs_eager_plain": step["compiled"] / step["eager-plain"]}
    report("compile_step", config, results)


if __name__ == "__main__":
    main()
