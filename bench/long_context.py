"""Long-context steps against the memory floor: an 8-path decode step and a summary step.

Random weights of the DeepSeek-R1-Distill-Qwen-1.5B shape (or `--model small`). For each
per-path context C (prompt + path tokens), the KV pool is filled directly (random K/V, no
prefill) for one request of P paths of C tokens each, then the engine runs whole steps:

- decode: every path forwards one token (context C each, the prompt shared);
- summary: the summary forwards one token over the prompt, every path and its template.

floor = (weights read once + every distinct context K/V read once) / read bandwidth, the
bandwidth measured in the same process (a sum over a 1 GiB tensor, best of 5). Also reported:
the host time per step to build the attention metadata (request work + runner metadata).

    python bench/long_context.py --sizes 128,2048,8192
    python bench/long_context.py --device cuda --dtype bfloat16 --attention flex --sizes 2048,16384
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import (DTYPES, add_model_flags, prompt_ids, random_model, report, start, sync,
                    synthetic_ctrl)
from parathinker.config import SamplingParams
from parathinker.engine import Engine
from parathinker.engine.request import Request, Seq
from parathinker.model.fast_linear import apply_linear_backend



def read_bandwidth(device: str) -> float:
    """Bytes per second of a plain read (sum over 1 GiB), best of 5."""
    x = torch.ones(1 << 28, device=device)
    best = float("inf")
    for _ in range(5):
        sync()
        t = time.perf_counter()
        x.sum().item()
        best = min(best, time.perf_counter() - t)
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


def filled_request(engine: Engine, name: str, prompt_len: int, path_len: int, num_paths: int,
                   summary: bool) -> Request:
    """A request whose prompt and paths (and summary template) are already in the KV cache,
    except each decoding sequence's last token: the next step forwards exactly one token each."""
    big = 1 << 30
    params = SamplingParams(num_paths=num_paths, max_path_tokens=big, min_path_tokens=big - 1,
                            min_finished_paths=num_paths, max_summary_tokens=big, temperature=0)
    req = engine.add_request(name, prompt_ids(prompt_len), params)
    assert isinstance(req, Request)
    bm = engine.block_manager
    engine.scheduler.waiting.remove(req)
    rest = [prompt_ids(path_len - 1, seed=k + 1) for k in range(num_paths)]
    for i in range(0, path_len - 1, bm.block_size):  # paths grow block by block, as in decoding
        for p, r in zip(req.paths, rest):
            p.tokens += r[i: i + bm.block_size]
        req.allocate(bm)
    if summary:
        for k, p in enumerate(req.paths):
            p.tokens.append(engine.ctrl.think_close[k])
            req.path_finish[k] = "budget"
        req.summary = Seq(list(engine.template_ids), 0, prompt_len + path_len)
    req.allocate(bm)
    req.status = "running"
    engine.scheduler.running.append(req)
    decoding = [req.summary] if summary else req.paths
    for seq in req.seqs():
        seq.num_computed = len(seq.tokens) - any(seq is d for d in decoding)
    return req


def time_steps(engine: Engine, steps: int) -> tuple[float, float]:
    """Median seconds of a whole engine step, and of building its metadata on the host."""
    engine.step()  # warm-up
    total, meta = [], []
    for _ in range(steps):
        scheduled, _ = engine.scheduler.schedule()
        t = time.perf_counter()
        work = [w for req, budget in scheduled for w in req.work(budget)]
        engine.runner.build(work)
        meta.append(time.perf_counter() - t)
        sync()
        t = time.perf_counter()
        engine.step()
        sync()
        total.append(time.perf_counter() - t)
    return statistics.median(total), statistics.median(meta)


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
    ap.add_argument("--steps", type=int, default=5, help="timed steps per measurement (median)")
    add_model_flags(ap)
    ap.add_argument("--profile", action="store_true", help="also profile one step of each kind")
    args = ap.parse_args()
    shape, config = start(args)
    model = random_model(shape, args.device, DTYPES[args.dtype])
    weights = weight_bytes(model)  # before prepacking (same bytes, other layout)
    config["linear"] = apply_linear_backend(model, args.linear)
    ctrl, template = synthetic_ctrl(shape["vocab_size"])
    cfg = model.config
    elem = DTYPES[args.dtype].itemsize
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elem
    sizes = [int(x) for x in args.sizes.split(",")]
    slots = max(sizes) * args.paths + 1024
    engine = Engine(model, ctrl, template, block_size=16, num_kv_blocks=-(-slots // 16),
                    attention=args.attention)
    config["attention"] = engine.runner.attention
    engine.runner.kv_cache.k.normal_()
    engine.runner.kv_cache.v.normal_()
    results = {}
    for size in sizes:
        prompt_len = min(128, size // 2)
        path_len = size - prompt_len
        bandwidth = read_bandwidth(args.device)
        row = {"bandwidth_GBps": bandwidth / 1e9, "prompt": prompt_len, "path": path_len}
        for kind in ("decode", "summary"):
            req = filled_request(engine, f"{kind}-{size}", prompt_len, path_len, args.paths,
                                 kind == "summary")
            context = prompt_len + args.paths * path_len + (len(template) if kind == "summary" else 0)
            seconds, meta = time_steps(engine, args.steps)
            top = profile_step(engine) if args.profile else None
            floor = (weights + context * kv_per_token) / bandwidth
            row[kind] = {"step_s": seconds, "floor_s": floor, "x_floor": seconds / floor,
                         "metadata_ms": meta * 1e3, "context_tokens": context}
            if top:
                row[kind]["profile_ms"] = top
            engine.abort(req.request_id)
            engine.step()
            print(f"C={size:6d} {kind:8s} step {seconds:.3f} s  floor {floor:.3f} s  "
                  f"{seconds / floor:.2f}x  metadata {meta * 1e3:.2f} ms  "
                  f"(context {context}, {bandwidth / 1e9:.1f} GB/s)")
        results[size] = row
    report("long_context", config, {"weights_GB": weights / 1e9, "kv_bytes_per_token": kv_per_token,
                                    "sizes": results})


if __name__ == "__main__":
    main()
