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
BLOCK = 16


def workload(lp: int, n: int, paths: list[int]) -> tuple[list[SeqWork], dict[int, list[SeqWork]], int]:
    """A prefill of a `lp`-token prompt and max(paths) paths of `n` tokens each (every path in
    blocks of its own past the prompt's), the decode step of the first P paths for each P, and
    the KV blocks they need."""
    stride = -(-(n + 1) // BLOCK) * BLOCK  # each path's own slots, past the prompt's

    def path_ctx(k: int, length: int) -> list[tuple[int, int]]:
        return [(0, lp), (lp + k * stride, length)]

    prefill = [SeqWork(list(range(100, 100 + lp)), list(range(lp)), 0, [(0, lp)], False, None)]
    prefill += [SeqWork([200 + k] * n, list(range(lp, lp + n)), k + 1, path_ctx(k, n), False, None)
                for k in range(max(paths))]
    decode = {p: [SeqWork([300 + k], [lp + n], k + 1, path_ctx(k, n + 1), True, None)
                  for k in range(p)] for p in paths}
    return prefill, decode, (lp + max(paths) * stride) // BLOCK + 2


def make_runner(shape: dict, args: argparse.Namespace, mode: str,
                num_blocks: int) -> tuple[ModelRunner, str]:
    """The runner of one mode over the seed-0 random weights; -> (runner, its linear backend)."""
    model = random_model(shape, args.device, DTYPES[args.dtype])
    linear = apply_linear_backend(model, args.linear if mode == "eager" else "plain")
    return ModelRunner(model, num_blocks, BLOCK, args.attention, mode == "compiled"), linear


def warm_up(runner: ModelRunner, prefill: list[SeqWork], decode: dict[int, list[SeqWork]]) -> None:
    """Prefill, then three steps of every P (compile, capture)."""
    runner.run(prefill)
    for work in decode.values():
        for _ in range(3):
            runner.run(work)


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
    prefill, decode, num_blocks = workload(args.prompt, args.context, paths)
    runners = {}
    for mode in MODES:
        runners[mode], config[f"linear_{mode}"] = make_runner(shape, args, mode, num_blocks)
    config["attention"] = runners["eager"].attention
    for runner in runners.values():
        warm_up(runner, prefill, decode)
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
