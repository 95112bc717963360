"""Against transformers: the same random 1.5B-shape model, prompt and 8 paths of N tokens.

Ours: one ParaThinker request with 8 paths (min_path_tokens = max_path_tokens = N).
transformers: `generate(num_return_sequences=8, min_new_tokens=N, max_new_tokens=N)` on a
Qwen2ForCausalLM holding the very same weights. Reported: generated tokens/s of each, and the ratio.

    python bench/vs_transformers.py --tokens 64
    python bench/vs_transformers.py --model small --tokens 64
"""

from __future__ import annotations

import argparse

import torch

from common import QWEN_1_5B, SHAPES, machine, prompt_ids, random_model, report, synthetic_ctrl, timed
from parathinker.config import SamplingParams
from parathinker.engine import Engine
from parathinker.model.fast_linear import apply_linear_backend


def hf_model(ours: torch.nn.Module, device: str, shape: dict = QWEN_1_5B,
             attn_implementation: str = "sdpa") -> torch.nn.Module:
    """A Qwen2ForCausalLM holding copies of `ours`'s weights (random weights of `shape`)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = {k: v for k, v in shape.items() if k not in ("model_type", "max_segments")}
    with torch.device("meta"):
        hf = Qwen2ForCausalLM(Qwen2Config(**cfg, attn_implementation=attn_implementation))
    hf = hf.to_empty(device=device)
    state = {k: v for k, v in ours.state_dict().items() if "seg_embeddings" not in k}
    hf.load_state_dict(state, strict=False)  # copies: ours is prepacked afterwards
    hf.model.rotary_emb.inv_freq = ours.inv_freq.clone()
    hf.model.rotary_emb.original_inv_freq = ours.inv_freq.clone()
    return hf.eval()


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--paths", type=int, default=8)
    ap.add_argument("--model", choices=list(SHAPES), default="1.5b",
                    help="random weights of the 1.5B shape, or the small one (hidden 512, 8 layers)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    shape = SHAPES[args.model]
    config = vars(args) | {"model_shape": shape, "dtype": "float32",
                           "sampling": "temperature 1.0 for both"}
    print("machine:", machine())
    print("config:", config)
    ours = random_model(shape, args.device)
    hf = hf_model(ours, args.device, shape)  # shares no storage with `ours` once ours is prepacked
    config["linear"] = apply_linear_backend(ours, "auto")
    ctrl, template = synthetic_ctrl(shape["vocab_size"])
    engine = Engine(ours, ctrl, template, num_kv_blocks=2048)
    prompt = prompt_ids(args.prompt)
    n, p = args.tokens, args.paths

    def run_ours(tokens: int) -> None:
        params = SamplingParams(num_paths=p, max_path_tokens=tokens + 2, min_path_tokens=tokens + 2,
                                min_finished_paths=p, max_summary_tokens=len(template) + 1,
                                temperature=1.0, seed=0)
        engine.add_request(f"ours-{tokens}", prompt, params)
        engine.run_to_completion()

    def run_hf(tokens: int) -> None:
        ids = torch.tensor([prompt], device=args.device)
        torch.manual_seed(0)
        with torch.inference_mode():
            hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                        temperature=1.0, num_return_sequences=p, min_new_tokens=tokens,
                        max_new_tokens=tokens, pad_token_id=0, eos_token_id=None)

    run_ours(4)
    run_hf(4)  # warm-up
    t_ours, _ = timed(lambda: run_ours(n))  # N content tokens per path (+ its two tags)
    t_hf, _ = timed(lambda: run_hf(n))
    ours_tps, hf_tps = p * n / t_ours, p * n / t_hf
    print(f"parathinker: {t_ours:.2f} s, {ours_tps:.1f} tokens/s")
    print(f"transformers: {t_hf:.2f} s, {hf_tps:.1f} tokens/s")
    print(f"speed-up: {ours_tps / hf_tps:.2f}x")
    report("vs_transformers", config, {"parathinker_s": t_ours, "transformers_s": t_hf,
                                       "parathinker_tokens_per_s": ours_tps,
                                       "transformers_tokens_per_s": hf_tps,
                                       "speedup": ours_tps / hf_tps})


if __name__ == "__main__":
    main()
