"""Ways to read K/V out of the paged pool for decode attention (CPU), against a plain read.

8 sequences decode one token, each over its own contiguous 4K-slot context of a pool
[Hkv, S, D] (the small model's attention shape: Hq 8, Hkv 2, D 64, float32):

- flash_folded: the CPU flash kernel per sequence, the G query heads of a KV head folded into
  its rows (what the runs backend does);
- flash_gqa: the same kernel with the Hq heads passed as they are (enable_gqa's layout);
- bmm_softmax: the runs backend before issue 25 (bmm, softmax, bmm per sequence);
- long_decode: what the runs backend does now for float32 decode tokens over long contexts
  (`attention.long_decode`, one layer of a step: the CPU kernels of `attention.native`, scores
  of every sequence in one call, a softmax, P @ V in one call);
- long_decode_matmuls: the same without the kernels (their twin: one step's buffers reused, a
  bmm per run into the scores, one softmax per sequence, P @ V);
- read: a plain sum over the same K/V bytes.

And the short-decode batch's gather of an [8, 400] slot table: `pool[:, slots]` (advanced
index) against `pool.index_select(1, slots)`. Every way runs in turn `--rounds` times; the
fastest and the median are reported.

    python bench/pool_reads.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import machine, report
import parathinker.attention.long_decode as long_decode
from parathinker.attention.long_decode import LongDecodes

FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--context", type=int, default=4096)
    args = ap.parse_args()
    torch.manual_seed(0)
    hkv, g, d, c, b = 2, 4, 64, args.context, 8
    config = vars(args) | {"hq": hkv * g, "hkv": hkv, "head_dim": d, "seqs": b}
    kp, vp = torch.randn(hkv, b * c + 1000, d), torch.randn(hkv, b * c + 1000, d)
    q = torch.randn(b, hkv * g, d)
    starts = [i * c for i in range(b)]
    slots = torch.randint(0, b * c, (b, 400))
    long, matmuls = (LongDecodes(list(range(b)), [[(a, c)] for a in starts], torch.arange(b), True)
                     for _ in range(2))
    long_decode.USE_NATIVE = False  # read at a step's first layer: matmuls keeps its choice
    matmuls.attend(0, q, kp[None], vp[None])
    long_decode.USE_NATIVE = True
    long.attend(0, q, kp[None], vp[None])
    config["kernels"] = long.buf.tables is not None  # False: no compiler here (attention.native)
    print("machine:", machine())
    print("config:", config)
    ways = {
        "flash_folded": lambda: [FLASH(q[i].view(1, hkv, g, d), kp[None, :, a: a + c], vp[None, :, a: a + c])
                                 for i, a in enumerate(starts)],
        "flash_gqa": lambda: [FLASH(q[i][None, :, None], kp[None, :, a: a + c], vp[None, :, a: a + c])
                              for i, a in enumerate(starts)],
        "bmm_softmax": lambda: [torch.bmm(torch.bmm(q[i].view(hkv, g, d) * d ** -0.5,
                                                    kp[:, a: a + c].transpose(1, 2)).softmax(-1),
                                          vp[:, a: a + c]) for i, a in enumerate(starts)],
        "long_decode": lambda: long.attend(0, q, kp[None], vp[None]),
        "long_decode_matmuls": lambda: matmuls.attend(0, q, kp[None], vp[None]),
        "read": lambda: (kp[:, : b * c].sum(), vp[:, : b * c].sum()),
        "gather_index": lambda: kp[:, slots],
        "gather_index_select": lambda: kp.index_select(1, slots.view(-1)),
    }
    times: dict[str, list[float]] = {k: [] for k in ways}
    for fn in ways.values():
        fn()  # warm-up
    for _ in range(args.rounds):
        for name, fn in ways.items():
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * 1e3)
    results = {k: {"best_ms": min(v), "median_ms": statistics.median(v)} for k, v in times.items()}
    for k, v in results.items():
        print(f"{k:20s} best {v['best_ms']:8.3f} ms  median {v['median_ms']:8.3f} ms")
    report("pool_reads", config, results)


if __name__ == "__main__":
    main()
