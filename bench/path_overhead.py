"""Path overhead: total generate time for P = 1, 2, 4, 8, 16 paths of N tokens, relative to P = 1.

Random weights of the DeepSeek-R1-Distill-Qwen-1.5B shape (or `--model small`), paths fixed in length with
min_path_tokens = max_path_tokens = N, every path waited for (min_finished_paths = P). The P
values run in turn, `--rounds` times over; each P keeps its fastest round (the machine is shared).
The KV pool holds the largest request (prompt + max P x N + summary).

    python bench/path_overhead.py --tokens 64
    python bench/path_overhead.py --device cuda --dtype bfloat16 --tokens 4096 --paths 1,8,16
"""

from __future__ import annotations

import argparse

from common import DTYPES, add_model_flags, prompt_ids, random_model, report, start, synthetic_ctrl, timed
from parathinker.config import SamplingParams
from parathinker.engine import Engine
from parathinker.model.fast_linear import apply_linear_backend


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--tokens", type=int, default=64, help="N tokens per path")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--paths", default="1,2,4,8,16")
    add_model_flags(ap)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repeats; the fastest counts")
    args = ap.parse_args()
    shape, config = start(args)
    model = random_model(shape, args.device, DTYPES[args.dtype])
    config["linear"] = apply_linear_backend(model, args.linear)
    ctrl, template = synthetic_ctrl(shape["vocab_size"])
    most = args.prompt + max(int(x) for x in args.paths.split(",")) * args.tokens + len(template) + 1
    engine = Engine(model, ctrl, template, num_kv_blocks=max(4096, most // 16 + 64),
                    attention=args.attention)
    config["attention"] = engine.runner.attention
    prompt = prompt_ids(args.prompt)

    def run(p: int, n: int) -> float:
        params = SamplingParams(num_paths=p, max_path_tokens=n, min_path_tokens=n,
                                min_finished_paths=p, max_summary_tokens=len(template) + 1,
                                temperature=0)
        engine.add_request(f"p{p}-{n}", prompt, params)
        seconds, (req,) = timed(engine.run_to_completion)
        assert all(len(x.tokens) == n for x in req.paths)
        return seconds

    run(2, 8)  # warm-up
    rounds: dict[int, list[float]] = {int(x): [] for x in args.paths.split(",")}
    for r in range(args.rounds):
        for p in rounds:
            rounds[p].append(run(p, args.tokens))
            print(f"round {r + 1}: P={p:2d}: {rounds[p][-1]:.2f} s")
    times = {p: min(ts) for p, ts in rounds.items()}
    for p, t in times.items():
        print(f"P={p:2d}: {t:.2f} s  ({t / times[1]:.2f}x P=1)")
    report("path_overhead", config, {"seconds": times, "rounds": rounds,
                                     "ratio_vs_p1": {p: t / times[1] for p, t in times.items()}})


if __name__ == "__main__":
    main()
