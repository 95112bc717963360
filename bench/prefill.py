"""Prefill against transformers: one forward over a fresh prompt of T tokens, ours (the paged
model with one step's metadata, as the engine's runner calls it, and the last row's logits)
against transformers' `Qwen2ForCausalLM` (attn_implementation="sdpa", `logits_to_keep=1`)
holding the very same random weights; and the peak RSS growth of each prefill.

Times: every size, ours and transformers alternating, `--repeats` times after a warm-up; the
median counts (the best and worst are printed too). Ours uses `--linear` (auto: oneDNN-prepacked
on CPU), transformers plain nn.Linear; `--linear plain` compares like with like. Peak RSS: a
fresh subprocess per size and side runs one prefill and reports its peak RSS (VmHWM, reset
through /proc/self/clear_refs just before: Linux only) minus the RSS before it; ours includes
the K/V the prefill writes (T x 2 x layers x Hkv x D x dtype bytes).

    python bench/prefill.py --model small --sizes 1024,4096,8192
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import time

import torch

from common import DTYPES, add_model_flags, prompt_ids, random_model, report, start, sync
from parathinker.attention.paged import backend_for
from parathinker.attention.pool import PagedKVCache
from parathinker.model.fast_linear import apply_linear_backend
from vs_transformers import hf_model


def vm_hwm() -> int:
    """Peak resident bytes of this process so far."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


class Sides:
    """Ours and transformers over the same weights; each side's `prefill(T)` -> seconds."""

    def __init__(self, args: argparse.Namespace, shape: dict, sides: tuple[str, ...]) -> None:
        self.args, self.dtype = args, DTYPES[args.dtype]
        self.ours = random_model(shape, args.device, self.dtype)
        self.hf = hf_model(self.ours, args.device, shape).to(self.dtype) if "hf" in sides else None
        self.linear = apply_linear_backend(self.ours, args.linear)
        self.backend = backend_for(args.attention, args.device)

    @torch.inference_mode()
    def prefill(self, side: str, t: int) -> float:
        dev = self.args.device
        ids = torch.tensor([prompt_ids(t)], device=dev)
        if side == "hf":
            sync()
            start = time.perf_counter()
            self.hf(ids, logits_to_keep=1)
            sync()
            return time.perf_counter() - start
        cfg = self.ours.config
        cache = PagedKVCache.allocate(cfg.num_hidden_layers, t, cfg.num_key_value_heads,
                                      cfg.head_dim, self.dtype, dev, self.backend.zeroed_pool)
        sync()
        start = time.perf_counter()
        meta = self.backend.build_metadata([t], [[(0, t)]], dev)
        pos = torch.arange(t, device=dev)[None]
        hidden = self.ours(ids, pos, torch.zeros_like(ids), meta, cache)
        self.ours.compute_logits(hidden[0, -1:])
        sync()
        return time.perf_counter() - start


def peak_rss(side: str, t: int) -> int:
    """VmHWM growth of one prefill of t tokens by `side`, in a fresh process."""
    out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--rss-child", f"{side}:{t}"],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--sizes", default="1024,4096,8192", help="prompt lengths")
    ap.add_argument("--repeats", type=int, default=3)
    add_model_flags(ap)
    ap.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    if args.rss_child:
        side, t = args.rss_child.split(":")
        torch.manual_seed(0)
        from common import SHAPES
        sides = Sides(args, SHAPES[args.model], (side,))
        sides.prefill(side, 64)  # warm-up: kernels, thread pools
        open("/proc/self/clear_refs", "w").write("5")  # peak RSS := RSS now (not the load's peak)
        before = vm_hwm()
        sides.prefill(side, int(t))
        print(vm_hwm() - before)
        return
    shape, config = start(args)
    sides = Sides(args, shape, ("ours", "hf"))
    config |= {"linear": sides.linear, "attention": sides.backend.name,
               "transformers": "Qwen2ForCausalLM sdpa, plain nn.Linear, logits_to_keep=1"}
    sides.prefill("ours", sizes[0])
    sides.prefill("hf", sizes[0])  # warm-up
    times: dict[str, dict[int, list[float]]] = {"ours": {t: [] for t in sizes},
                                                 "hf": {t: [] for t in sizes}}
    for _ in range(args.repeats):
        for t in sizes:
            for side in ("ours", "hf"):
                times[side][t].append(sides.prefill(side, t))
    del sides  # the peak-RSS children load a model each: the parent's two would not fit beside
    gc.collect()  # them at the 1.5B shape on a 24 GB machine
    results = {}
    for t in sizes:
        med = {s: statistics.median(times[s][t]) for s in times}
        rss = {s: peak_rss(s, t) / 1e9 for s in times} if args.device == "cpu" else {}
        results[t] = {"ours_s": med["ours"], "hf_s": med["hf"], "x_hf": med["ours"] / med["hf"],
                      "ours_runs_s": times["ours"][t], "hf_runs_s": times["hf"][t],
                      "peak_rss_growth_GB": rss}
        print(f"T={t:6d} ours {med['ours']:.3f} s  transformers {med['hf']:.3f} s  "
              f"{med['ours'] / med['hf']:.2f}x  (ours {min(times['ours'][t]):.3f}-"
              f"{max(times['ours'][t]):.3f}, hf {min(times['hf'][t]):.3f}-{max(times['hf'][t]):.3f})"
              f"  peak RSS growth {rss}")
    small, big = sizes[0], sizes[-1]
    results["ours_T_ratio"] = results[big]["ours_s"] / results[small]["ours_s"]
    print(f"ours T({big})/T({small}) = {results['ours_T_ratio']:.1f}")
    report("prefill", config, results)


if __name__ == "__main__":
    main()
