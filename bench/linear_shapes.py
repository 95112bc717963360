"""Memory of the prepacked linears' oneDNN shapes (issue 22 against issue 25): one `PackedLinear`
builds every padded row size up to CHUNK_ROWS (`forward` and `forward_add`, the fused layer's two
calls), then runs `--counts` distinct row counts spread over 1 to `--max-rows`; the process's RSS
growth is printed after each phase. The first phase is what a server pays once per layer shape
and op; the second must add (close to) nothing: no new shapes.

RSS also holds what glibc keeps of freed buffers (its mmap threshold grows with the largest one
freed); `MALLOC_MMAP_THRESHOLD_=131072` in the environment leaves oneDNN's own share.

    python bench/linear_shapes.py
    MALLOC_MMAP_THRESHOLD_=131072 python bench/linear_shapes.py
"""

from __future__ import annotations

import argparse
import os

import torch

from common import machine, report
from parathinker.model.fast_linear import CHUNK_ROWS, PackedLinear, padded_rows


def rss_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--in-features", type=int, default=64)
    ap.add_argument("--out-features", type=int, default=256)
    ap.add_argument("--counts", type=int, default=600)
    ap.add_argument("--max-rows", type=int, default=16384)
    args = ap.parse_args()
    config = vars(args) | {"chunk_rows": CHUNK_ROWS, "malloc_mmap_threshold":
                           os.environ.get("MALLOC_MMAP_THRESHOLD_")}
    print("machine:", machine())
    print("config:", config)
    k, n = args.in_features, args.out_features
    packed = PackedLinear(torch.nn.Linear(k, n))
    sizes = sorted({padded_rows(m) for m in range(1, CHUNK_ROWS + 1)})
    counts = sorted({1 + i * (args.max_rows - 1) // (args.counts - 1) for i in range(args.counts)})
    torch.set_grad_enabled(False)
    start = rss_mb()
    for m in sizes:
        packed(torch.zeros(m, k))
        packed.forward_add(torch.zeros(m, k), torch.zeros(m, n))
    built = rss_mb()
    for m in counts:
        packed(torch.zeros(m, k))
        packed.forward_add(torch.zeros(m, k), torch.zeros(m, n))
    results = {"shapes": len(sizes), "build_MB": built - start, "counts": len(counts),
               "counts_MB": rss_mb() - built}
    print(f"{len(sizes)} padded sizes x 2 ops built: +{results['build_MB']:.1f} MB; then "
          f"{len(counts)} distinct counts in 1..{args.max_rows}: +{results['counts_MB']:.1f} MB")
    report("linear_shapes", config, results)


if __name__ == "__main__":
    main()
