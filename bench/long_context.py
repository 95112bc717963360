"""Long-context steps against the memory floor: an 8-path decode step, a summary step, and a
decode step of 8 separate requests.

Random weights of the DeepSeek-R1-Distill-Qwen-1.5B shape (or `--model small`). For each
per-path context C (prompt + path tokens), the KV pool is filled directly (random K/V, no
prefill; the paths' blocks allocated block by block in lock-step, as decoding does), then the
engine runs whole steps:

- decode: one request of P paths; every path forwards one token (context C each, the prompt shared);
- summary: its summary forwards one token over the prompt, every path and its template;
- separate: P requests of one path each, each over its own context of C tokens (nothing shared);
  every one forwards one token.

floor = (weights read once + every distinct context K/V read once) / read bandwidth, the
bandwidth measured in the same process (a sum over a 1 GiB tensor, best of 5). Each kind is
measured `--runs` times (a fresh request each time, the median of `--steps` steps each); the
spread (min / median / max over runs) is reported, with the page faults per step (minor, major)
and the process's RSS against weights + pool. Also reported: the host time per step to build
the attention metadata (request work + runner metadata), and how many runs of the pool each
context is in, per run (`runs_per_context`: the attention costs two matmuls per run and layer).

--cpu-time: one torch thread, and every time (steps, the floor's read) is the main thread's CPU
time (time.thread_time): what the work costs while it holds a core, which other processes on a
shared machine barely change (wall time of 2 threads under load is mostly waiting: each op's
threads wait for the one descheduled). Not the issue's measure (2 threads, wall, quiet machine);
a load-proof comparison of two packages.

    python bench/long_context.py --sizes 128,2048,8192
    python bench/long_context.py --model small --sizes 4096 --kinds separate --runs 5
    python bench/long_context.py --model small --sizes 4096 --cpu-time
    python bench/long_context.py --device cuda --dtype bfloat16 --attention flex --sizes 2048,16384
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from common import (DTYPES, add_model_flags, prompt_ids, random_model, report, start, sync,
                    synthetic_ctrl)
from parathinker.config import SamplingParams
from parathinker.engine import Engine
from parathinker.engine.request import Request, Seq
from parathinker.model.fast_linear import apply_linear_backend

CLOCK = time.perf_counter  # time.thread_time with --cpu-time


def read_bandwidth(device: str) -> float:
    """Bytes per second of a plain read (sum over 1 GiB), best of 5."""
    x = torch.ones(1 << 28, device=device)
    best = float("inf")
    for _ in range(5):
        sync()
        t = CLOCK()
        x.sum().item()
        best = min(best, CLOCK() - t)
    return x.numel() * x.element_size() / best


def weight_bytes(model: torch.nn.Module) -> int:
    """What a decode step reads: every weight except the embedding table (rows are gathered)."""
    emb = model.model.embed_tokens.weight
    seen = {emb.data_ptr()} if emb is not model.lm_head.weight else set()
    total = 0
    for p in list(model.parameters()) + list(model.buffers()):
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def filled_requests(engine: Engine, name: str, prompt_len: int, path_len: int, num_paths: int,
                    kind: str) -> list[Request]:
    """Requests whose prompt and paths (and summary template) are already in the KV cache,
    except each decoding sequence's last token: the next step forwards exactly one token each.
    decode/summary: one request of num_paths paths; separate: num_paths requests of one path."""
    big = 1 << 30
    count, paths = (num_paths, 1) if kind == "separate" else (1, num_paths)
    params = SamplingParams(num_paths=paths, max_path_tokens=big, min_path_tokens=big - 1,
                            min_finished_paths=paths, max_summary_tokens=big, temperature=0)
    reqs = []
    for r in range(count):
        req = engine.add_request(f"{name}-{r}", prompt_ids(prompt_len, seed=100 + r), params)
        assert isinstance(req, Request)
        engine.scheduler.waiting.remove(req)
        reqs.append(req)
    bm = engine.block_manager
    rest = [prompt_ids(path_len - 1, seed=k + 1) for k in range(num_paths)]
    seqs = [p for req in reqs for p in req.paths]
    for i in range(0, path_len - 1, bm.block_size):  # paths grow block by block, as in decoding
        for p, r in zip(seqs, rest):
            p.tokens += r[i: i + bm.block_size]
        for req in reqs:
            req.allocate(bm)
    for req in reqs:
        if kind == "summary":
            for k, p in enumerate(req.paths):
                p.tokens.append(engine.ctrl.think_close[k])
                req.path_finish[k] = "budget"
            req.summary = Seq(list(engine.template_ids), 0, prompt_len + path_len)
        req.allocate(bm)
        req.status = "running"
        engine.scheduler.running.append(req)
        decoding = [req.summary] if kind == "summary" else req.paths
        for seq in req.seqs():
            seq.num_computed = len(seq.tokens) - any(seq is d for d in decoding)
    return reqs


def faults() -> tuple[int, int]:
    """(minor, major) page faults of this process so far."""
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_minflt, use.ru_majflt


def rss_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def time_steps(engine: Engine, steps: int) -> tuple[float, float, tuple[float, float], list[int]]:
    """Median seconds of a whole engine step, of building its metadata on the host, the
    (minor, major) page faults per timed step, and the runs of the pool each context is in."""
    engine.step()  # warm-up
    total, meta = [], []
    before = faults()
    for _ in range(steps):
        scheduled, _ = engine.scheduler.schedule()
        t = CLOCK()
        work = [w for req, budget in scheduled for w in req.work(budget)]
        built = engine.runner.build(work)[3]
        meta.append(CLOCK() - t)
        sync()
        t = CLOCK()
        engine.step()
        sync()
        total.append(CLOCK() - t)
    after = faults()
    per_step = ((after[0] - before[0]) / steps, (after[1] - before[1]) / steps)
    runs = [len(built.runs(s)) for s in range(built.num_seqs)]
    return statistics.median(total), statistics.median(meta), per_step, runs


def profile_step(engine: Engine, top: int = 8) -> dict[str, float]:
    """Self time (ms) of the `top` most expensive torch ops of one engine step."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        engine.step()
        sync()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    out = {e.key: e.self_cpu_time_total / 1e3 for e in ops}
    print("   profile (self ms):", ", ".join(f"{k} {v:.1f}" for k, v in out.items()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--sizes", default="128,2048,8192", help="per-path contexts (prompt + path)")
    ap.add_argument("--paths", type=int, default=8)
    ap.add_argument("--kinds", default="decode,summary,separate",
                    help="which steps: decode, summary, separate (comma-separated)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per run (median)")
    ap.add_argument("--runs", type=int, default=3, help="runs per measurement (spread reported)")
    add_model_flags(ap)
    ap.add_argument("--profile", action="store_true", help="also profile one step of each kind")
    ap.add_argument("--cpu-time", action="store_true",
                    help="one thread, timed by its CPU time (see the module docstring)")
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    if not set(kinds) <= {"decode", "summary", "separate"} or args.runs < 1 or args.steps < 1:
        ap.error("--kinds takes decode, summary, separate; --runs and --steps at least 1")
    if args.cpu_time:
        if args.device != "cpu":
            ap.error("--cpu-time times the CPU: use --device cpu")
        global CLOCK
        CLOCK = time.thread_time
        torch.set_num_threads(1)
    shape, config = start(args)
    model = random_model(shape, args.device, DTYPES[args.dtype])
    weights = weight_bytes(model)  # before prepacking (same bytes, other layout)
    config["linear"] = apply_linear_backend(model, args.linear)
    ctrl, template = synthetic_ctrl(shape["vocab_size"])
    cfg = model.config
    elem = DTYPES[args.dtype].itemsize
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elem
    sizes = [int(x) for x in args.sizes.split(",")]
    slots = max(sizes) * args.paths + 128 * args.paths + 1024
    engine = Engine(model, ctrl, template, block_size=16, num_kv_blocks=-(-slots // 16),
                    attention=args.attention)
    config["attention"] = engine.runner.attention
    engine.runner.kv_cache.k.normal_()  # every page of the pool touched before any timing
    engine.runner.kv_cache.v.normal_()
    pool = 2 * engine.runner.kv_cache.k.numel() * elem
    print(f"weights {weights / 1e9:.2f} GB, pool {pool / 1e9:.2f} GB, RSS {rss_bytes() / 1e9:.2f} GB")
    results = {}
    for size in sizes:
        prompt_len = min(128, size // 2)
        path_len = size - prompt_len
        bandwidth = read_bandwidth(args.device)
        row = {"bandwidth_GBps": bandwidth / 1e9, "prompt": prompt_len, "path": path_len}
        for kind in kinds:
            context = {"decode": prompt_len + args.paths * path_len,
                       "summary": prompt_len + args.paths * path_len + len(template),
                       "separate": args.paths * size}[kind]
            floor = (weights + context * kv_per_token) / bandwidth
            runs, metas, flts, runs_per_context = [], [], [], []
            for r in range(args.runs):
                reqs = filled_requests(engine, f"{kind}-{size}-{r}", prompt_len, path_len,
                                       args.paths, kind)
                seconds, meta, flt, pieces = time_steps(engine, args.steps)
                runs.append(seconds)
                metas.append(meta)
                flts.append(flt)
                runs_per_context.append(pieces)
                top = profile_step(engine) if args.profile and r == 0 else None
                for req in reqs:
                    engine.abort(req.request_id)
                engine.step()
            med = statistics.median(runs)
            row[kind] = {"step_s": med, "runs_s": runs, "floor_s": floor,
                         "x_floor": med / floor, "x_floor_min_max": [min(runs) / floor, max(runs) / floor],
                         "metadata_ms": statistics.median(metas) * 1e3, "context_tokens": context,
                         "faults_per_step_minor_major": flts[-1], "rss_GB": rss_bytes() / 1e9,
                         "runs_per_context": runs_per_context}
            if top:
                row[kind]["profile_ms"] = top
            print(f"C={size:6d} {kind:8s} step {med:.3f} s (runs {min(runs):.3f}-{max(runs):.3f})  "
                  f"floor {floor:.3f} s  {med / floor:.2f}x ({min(runs) / floor:.2f}-"
                  f"{max(runs) / floor:.2f})  metadata {statistics.median(metas) * 1e3:.2f} ms  "
                  f"faults/step {flts[-1][0]:.0f}/{flts[-1][1]:.0f}  runs/context "
                  f"{'/'.join(f'{min(r)}-{max(r)}' for r in runs_per_context)}  (context {context}, "
                  f"{bandwidth / 1e9:.1f} GB/s)")
        results[size] = row
    report("long_context", config, {"weights_GB": weights / 1e9, "pool_GB": pool / 1e9,
                                    "kv_bytes_per_token": kv_per_token, "sizes": results})


if __name__ == "__main__":
    main()
