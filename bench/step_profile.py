"""Where one decode step's time goes: the host against the device, and the top kernels.

The workload of `bench/compile_step.py` (P paths of --context tokens each over a --prompt-token
prompt, random weights) through one runner (--mode eager / eager-plain / compiled), warmed up,
then --steps steps under torch.profiler. Per step: the wall time (synchronized), the host time
the runner's Python spends before returning (unsynchronized, so a device that keeps up hides
behind it), and on CUDA the sum of kernel times (the device's busy time; with CUDA graphs the
replayed kernels are counted when the profiler traces into graph replays, as recent CUDA does:
a device time near zero under graphs means it did not). The top ops by self device time (CUDA)
or self CPU time (CPU) are printed, and the step's split is the JSON line's.

    python bench/step_profile.py --model small --paths 8 --context 4096 --mode compiled
    python bench/step_profile.py --device cuda --dtype bfloat16 --paths 1,16 --context 4096
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from common import add_model_flags, report, start, sync, timed
from compile_step import MODES, make_runner, warm_up, workload


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--context", type=int, default=4096, help="tokens of each path so far")
    ap.add_argument("--paths", default="1,8", help="comma list of P (the decode batch)")
    ap.add_argument("--mode", choices=MODES, default="compiled")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=12)
    add_model_flags(ap)
    args = ap.parse_args()
    shape, config = start(args)
    paths = [int(x) for x in args.paths.split(",")]
    prefill, decode, num_blocks = workload(args.prompt, args.context, paths)
    runner, config["linear"] = make_runner(shape, args, args.mode, num_blocks)
    config["attention"] = runner.attention
    warm_up(runner, prefill, decode)
    cuda = args.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    results = {}
    for p in paths:
        work = decode[p]
        wall = statistics.median(timed(lambda: runner.run(work))[0] for _ in range(args.steps))
        host = []
        for _ in range(args.steps):
            sync()
            t = time.perf_counter()
            runner.run(work)
            host.append(time.perf_counter() - t)
        sync()
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                runner.run(work)
            sync()
        events = prof.key_averages()
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        device_us = sum(e.self_device_time_total for e in events) / args.steps if cuda else None
        print(f"P={p}: wall {wall * 1e3:.2f} ms, host {statistics.median(host) * 1e3:.2f} ms"
              + (f", device busy {device_us / 1e3:.2f} ms" if cuda else ""))
        print(events.table(sort_by=key, row_limit=args.top, max_name_column_width=60))
        top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[: args.top]
        results[p] = {"wall_ms": wall * 1e3, "host_ms": statistics.median(host) * 1e3,
                      "device_busy_ms": None if device_us is None else device_us / 1e3,
                      "top": [{"name": e.key, "self_us_per_step": getattr(e, key) / args.steps,
                               "calls_per_step": e.count / args.steps} for e in top]}
    report("step_profile", config, results)


if __name__ == "__main__":
    main()
