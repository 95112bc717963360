"""Summary cost: time to the first summary token once 8 paths of 512 tokens are done, with the
KV reuse of this engine, against recomputing the merged context from scratch (what systems
without KV reuse do: one dense forward over prompt + every path + the summary template).

The paths' KV is put in place by one untimed prefill step (random path tokens), then the timed
step forwards the 8 closing tags and the template over the reused KV and samples the first
summary token. Both ways must choose the same first summary token (checked).

    python bench/summary_cost.py --paths 8 --tokens 512
"""

from __future__ import annotations

import argparse

import torch

from common import QWEN_1_5B, machine, prompt_ids, random_model, report, synthetic_ctrl, timed
from parathinker.attention.dense import DenseAttention
from parathinker.config import SamplingParams
from parathinker.engine import Engine
from parathinker.model.fast_linear import apply_linear_backend
from parathinker.train.request_row import pack_request, row_tensors


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--paths", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512, help="tokens per path, tags included")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    config = vars(args) | {"model": "random Qwen2-1.5B shape", "dtype": "float32"}
    print("machine:", machine())
    print("config:", config)
    model = random_model(QWEN_1_5B, args.device)
    config["linear"] = apply_linear_backend(model, "auto")
    ctrl, template = synthetic_ctrl(QWEN_1_5B["vocab_size"])
    engine = Engine(model, ctrl, template, num_kv_blocks=1024)
    prompt = prompt_ids(args.prompt)
    p, n = args.paths, args.tokens
    params = SamplingParams(num_paths=p, max_path_tokens=n, min_path_tokens=n, min_finished_paths=p,
                            max_summary_tokens=len(template) + 1, temperature=0)

    def first_summary_token_with_reuse(request_id: str) -> tuple[float, int]:
        req = engine.add_request(request_id, prompt, params)
        for k, path in enumerate(req.paths):  # n - 1 tokens: the next one is the budget close
            path.tokens += prompt_ids(n - 2, seed=k + 1)
        engine.step()  # untimed: prompt + paths prefilled, paths closed, summary template queued
        assert req.summary is not None and len(req.summary.tokens) == len(template)
        seconds, _ = timed(engine.step)
        token = req.summary.tokens[len(template)]
        engine.run_to_completion()
        return seconds, token

    def first_summary_token_recomputed(paths: list[list[int]]) -> tuple[float, int]:
        row = pack_request(prompt, paths, template)
        t = row_tensors(row, args.device)

        def forward() -> int:
            with torch.inference_mode():
                hidden = model(t["input_ids"], t["positions"], t["segment_ids"], DenseAttention(t["mask"]))
                return int(model.compute_logits(hidden[0, -1:]).argmax())

        return timed(forward)

    first_summary_token_with_reuse("warm-up")
    t_reuse, tok_reuse = first_summary_token_with_reuse("timed")
    paths = [[ctrl.think_open[k]] + prompt_ids(n - 2, seed=k + 1) + [ctrl.think_close[k]] for k in range(p)]
    t_recompute, tok_recompute = first_summary_token_recomputed(paths)
    assert tok_reuse == tok_recompute, (tok_reuse, tok_recompute)
    print(f"with KV reuse: {t_reuse * 1000:.1f} ms to the first summary token")
    print(f"recomputed:    {t_recompute * 1000:.1f} ms ({len(prompt) + p * n + len(template)} tokens)")
    print(f"speed-up: {t_recompute / t_reuse:.1f}x")
    report("summary_cost", config, {"reuse_s": t_reuse, "recompute_s": t_recompute,
                                    "speedup": t_recompute / t_reuse})


if __name__ == "__main__":
    main()
