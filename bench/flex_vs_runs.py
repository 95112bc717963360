"""One decode step's attention (one layer) over the paged pool: the flex backend (compiled
FlexAttention, `parathinker.attention.flex_paged`) against the runs backend, on this machine.

S sequences decode one token each, every one over its own context of C tokens, at the 1.5B shape
(Hq 12, Hkv 2, D 128). Two pool layouts: "contiguous" (each context one run of slots) and
"interleaved" (16-slot blocks dealt round-robin to the sequences, as paths decoding side by side
allocate them: a context is C / 16 runs). Times are per layer call after a warm-up (the compile),
fastest of --rounds; the step's metadata build (once per step, all layers) is timed apart. The
floor: a plain read (sum) of the same K/V bytes, fastest of --rounds, in the same process.

    python bench/flex_vs_runs.py                      # CPU, float32, 8 x 8K
    python bench/flex_vs_runs.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import time

import torch

from common import machine, report, sync
from parathinker.attention.paged import backend_for
from parathinker.attention.pool import PagedKVCache

BLOCK = 16


def contexts_for(layout: str, num_seqs: int, ctx: int) -> list[list[tuple[int, int]]]:
    if layout == "contiguous":
        return [[(s * ctx, ctx)] for s in range(num_seqs)]
    num_blocks = ctx // BLOCK
    return [[((b * num_seqs + s) * BLOCK, BLOCK) for b in range(num_blocks)] for s in range(num_seqs)]


def best_of(fn, calls: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--layouts", default="contiguous,interleaved")
    ap.add_argument("--backends", default="runs,flex")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    hq, hkv, d = 12, 2, 128
    dtype = getattr(torch, args.dtype)
    config = vars(args) | {"hq": hq, "hkv": hkv, "head_dim": d, "block": BLOCK}
    print("machine:", machine())
    print("config:", config)
    num_slots = args.seqs * args.context
    cache = PagedKVCache.allocate(1, num_slots, hkv, d, dtype, args.device)
    cache.k.normal_()
    cache.v.normal_()
    q = torch.randn(1, args.seqs, hq, d, device=args.device, dtype=dtype)
    k = torch.randn(1, args.seqs, hkv, d, device=args.device, dtype=dtype)
    v = torch.randn(1, args.seqs, hkv, d, device=args.device, dtype=dtype)
    kv_bytes = 2 * num_slots * hkv * d * cache.k.element_size()
    read = best_of(lambda: (cache.k.sum(), cache.v.sum()), args.calls, args.rounds)
    results = {"kv_bytes_per_layer": kv_bytes, "read_ms": round(read * 1e3, 3),
               "read_GBps": round(kv_bytes / read / 1e9, 1)}
    print("plain read", results, flush=True)
    for layout in args.layouts.split(","):
        contexts = contexts_for(layout, args.seqs, args.context)
        for backend in args.backends.split(","):
            chosen = backend_for(backend, args.device)

            def build():
                return chosen.build_metadata([1] * args.seqs, contexts, args.device)

            meta = build()
            t0 = time.perf_counter()
            meta.attend(0, q, k, v, cache)  # warm-up (flex: the compile)
            sync()
            warm = time.perf_counter() - t0
            attend = best_of(lambda: meta.attend(0, q, k, v, cache), args.calls, args.rounds)
            meta_s = best_of(build, args.calls, args.rounds)
            name = f"{layout}/{backend}"
            results[name] = {"attend_ms": round(attend * 1e3, 3), "build_ms": round(meta_s * 1e3, 3),
                             "warmup_s": round(warm, 2), "kv_GBps": round(kv_bytes / attend / 1e9, 1),
                             "x_read": round(attend / read, 2)}
            print(name, results[name], flush=True)
    report("flex_vs_runs", config, results)


if __name__ == "__main__":
    main()
