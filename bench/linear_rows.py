"""Cost of one linear layer against its number of rows (the decode batch: one row per path), with
weights prepacked for oneDNN and with plain `F.linear`, on CPU; `PackedLinear` is the prepacked
call with its rows in chunks of at most CHUNK_ROWS, each padded to `padded_rows` (what the engine
runs: issue 22's fix for oneDNN's per-shape caches), so padded or chunked rows show what it costs.

The 1.5B model's widest layer (1536 -> 8960, the MLP's gate/up shape), float32. Each row count
runs `--calls` times after a warm-up, `--rounds` times in turn; the fastest round counts.

    python bench/linear_rows.py
    python bench/linear_rows.py --rows 16,17,100,257,1000 --calls 10
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from common import machine, report
from parathinker.model.fast_linear import CHUNK_ROWS, PackedLinear, padded_rows


def computed(rows: int) -> str:
    """The rows PackedLinear computes for `rows`: its chunks, each padded."""
    return "+".join(str(padded_rows(min(CHUNK_ROWS, rows - i))) for i in range(0, rows, CHUNK_ROWS))


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--rows", default="1,2,4,8,16")
    ap.add_argument("--in-features", type=int, default=1536)
    ap.add_argument("--out-features", type=int, default=8960)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    config = vars(args) | {"dtype": "float32"}
    print("machine:", machine())
    print("config:", config)
    w = torch.randn(args.out_features, args.in_features)
    packed = torch.ops.mkldnn._reorder_linear_weight(w)
    layer = torch.nn.Linear(args.in_features, args.out_features, bias=False)
    layer.weight.data = w
    ways = {"packed": lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),
            "F.linear": lambda x: F.linear(x, w), "PackedLinear": PackedLinear(layer)}
    rows = [int(r) for r in args.rows.split(",")]
    best = {name: {m: float("inf") for m in rows} for name in ways}
    torch.set_grad_enabled(False)
    for _ in range(args.rounds):
        for m in rows:
            x = torch.randn(m, args.in_features)
            for name, f in ways.items():
                for _ in range(3):
                    f(x)
                start = time.perf_counter()
                for _ in range(args.calls):
                    f(x)
                ms = (time.perf_counter() - start) / args.calls * 1e3
                best[name][m] = min(best[name][m], ms)
    for m in rows:
        print(f"rows={m:2d}: packed {best['packed'][m]:.2f} ms ({best['packed'][m] / best['packed'][rows[0]]:.2f}x)"
              f"  F.linear {best['F.linear'][m]:.2f} ms ({best['F.linear'][m] / best['F.linear'][rows[0]]:.2f}x)"
              f"  PackedLinear ({computed(m)} rows) {best['PackedLinear'][m]:.2f} ms "
              f"({best['PackedLinear'][m] / best['packed'][m]:.2f}x packed)")
    report("linear_rows", config, {"ms": best})


if __name__ == "__main__":
    main()
