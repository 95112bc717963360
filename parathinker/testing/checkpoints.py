"""Tiny random checkpoints and byte-level BPE tokenizers for offline CPU tests (well under 1 s)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from parathinker.config import ModelConfig
from parathinker.model import ParaThinkerForCausalLM, save_model
from parathinker.testing.tiny import EOS, tiny_config, train_tokenizer
from parathinker.spec.tokens import DEFAULT_PROMPT_TEMPLATE, DEFAULT_SUMMARY_TEMPLATE

CORPUS = [
    DEFAULT_PROMPT_TEMPLATE.replace("{question}", "What is 2+3?"),
    DEFAULT_SUMMARY_TEMPLATE + " \\boxed{5}.",
    "Let x be a number. Then 2x + 3 = 11, so x = 4. Check: 2*4+3 = 11. The answer is \\boxed{4}.",
    "We try n = 1, 2, 3, ... and check each; 7 * 3 mod 10 = 1, so n = 3 works.",
    "The sum of the first 10 positive integers is 55; the product of 6 and 7 is 42.",
    "Compute \\frac{1}{2} + \\frac{1}{3} = \\frac{5}{6}. Wait, let me re-check the arithmetic.",
] * 4


def make_tokenizer(num_paths: int = 8, vocab_size: int = 300, with_paths: bool = True) -> Any:
    return train_tokenizer(CORPUS, vocab_size, num_paths, with_paths)


def make_checkpoint(out_dir: Path, *, model_type: str = "qwen2", seg_tables: bool = True,
                    seed: int = 0, end_boost: float = 1.0, extra_vocab: int = 13,
                    tokenizer: Any = None, **config_kw: Any) -> Path:
    """Random weights + tokenizer saved as a HF checkpoint directory.

    `extra_vocab` embedding rows beyond the tokenizer's size (as in real checkpoints);
    `end_boost` scales the LM-head rows of end tokens so that paths end more often."""
    tokenizer = tokenizer or make_tokenizer()
    cfg = ModelConfig.from_dict(tiny_config(len(tokenizer) + extra_vocab, model_type, **config_kw))
    torch.manual_seed(seed)
    model = ParaThinkerForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("seg_embeddings.weight"):
                p.normal_(0, 0.5 if seg_tables else 0.0)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
        vocab = tokenizer.get_vocab()
        ends = [vocab[t] for t in vocab if t.startswith("</think") or t == EOS or t == "</summary>"]
        model.lm_head.weight[ends] *= end_boost
    save_model(model, out_dir, tokenizer)
    if not seg_tables:  # a base model: no seg tensors at all
        from safetensors.torch import load_file, save_file

        f = out_dir / "model.safetensors"
        state = {k: v for k, v in load_file(f).items() if "seg_embeddings" not in k}
        save_file(state, f, metadata={"format": "pt"})
        raw = json.loads((out_dir / "config.json").read_text())
        raw.pop("max_segments", None)
        (out_dir / "config.json").write_text(json.dumps(raw, indent=2))
    return out_dir
