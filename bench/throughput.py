"""Throughput: 16 requests x 4 paths on a smaller model, continuous batching (all submitted at
once to one engine) against one request at a time. Paths fixed in length (min = max tokens).

    python bench/throughput.py --requests 16 --paths 4 --tokens 64
"""

from __future__ import annotations

import argparse

import torch

from common import SMALL, machine, prompt_ids, random_model, report, synthetic_ctrl, timed
from parathinker.config import SamplingParams
from parathinker.engine import Engine
from parathinker.model.fast_linear import apply_linear_backend


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--paths", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=96)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    config = vars(args) | {"model": "random Qwen2 shape, hidden 512, 8 layers, vocab 32000",
                           "dtype": "float32"}
    print("machine:", machine())
    print("config:", config)
    model = random_model(SMALL, args.device)
    config["linear"] = apply_linear_backend(model, "auto")
    ctrl, template = synthetic_ctrl(SMALL["vocab_size"])
    engine = Engine(model, ctrl, template, num_kv_blocks=8192)
    params = SamplingParams(num_paths=args.paths, max_path_tokens=args.tokens,
                            min_path_tokens=args.tokens, min_finished_paths=args.paths,
                            max_summary_tokens=len(template) + 8, temperature=0)
    prompts = [prompt_ids(args.prompt, seed=i) for i in range(args.requests)]
    tokens_per_request = args.paths * args.tokens

    def batched(tag: str) -> None:
        for i, ids in enumerate(prompts):
            engine.add_request(f"{tag}-{i}", ids, params)
        engine.run_to_completion()

    def one_at_a_time(tag: str) -> None:
        for i, ids in enumerate(prompts):
            engine.add_request(f"{tag}-{i}", ids, params)
            engine.run_to_completion()

    batched("warm-up")
    t_batched, _ = timed(lambda: batched("batched"))
    t_serial, _ = timed(lambda: one_at_a_time("serial"))
    total = args.requests * tokens_per_request
    print(f"continuous batching: {t_batched:.2f} s, {total / t_batched:.0f} path tokens/s")
    print(f"one at a time:       {t_serial:.2f} s, {total / t_serial:.0f} path tokens/s")
    print(f"speed-up: {t_serial / t_batched:.2f}x")
    report("throughput", config, {"batched_s": t_batched, "serial_s": t_serial,
                                  "batched_path_tokens_per_s": total / t_batched,
                                  "serial_path_tokens_per_s": total / t_serial,
                                  "speedup": t_serial / t_batched})


if __name__ == "__main__":
    main()
