"""Tiny random checkpoints and byte-level BPE tokenizers for offline CPU tests (well under 1 s)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from parathinker.config import ModelConfig
from parathinker.model import ParaThinkerForCausalLM, save_model
from parathinker.tokens import DEFAULT_PROMPT_TEMPLATE, DEFAULT_SUMMARY_TEMPLATE, parathinker_token_names

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
BASE_SPECIAL = [BOS, EOS, "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]
CORPUS = [
    DEFAULT_PROMPT_TEMPLATE.format(question="What is 2+3?"),
    DEFAULT_SUMMARY_TEMPLATE + " \\boxed{5}.",
    "Let x be a number. Then 2x + 3 = 11, so x = 4. Check: 2*4+3 = 11. The answer is \\boxed{4}.",
    "We try n = 1, 2, 3, ... and check each; 7 * 3 mod 10 = 1, so n = 3 works.",
    "The sum of the first 10 positive integers is 55; the product of 6 and 7 is 42.",
    "Compute \\frac{1}{2} + \\frac{1}{3} = \\frac{5}{6}. Wait, let me re-check the arithmetic.",
] * 4


def make_tokenizer(num_paths: int = 8, vocab_size: int = 300, with_paths: bool = True) -> Any:
    """A byte-level BPE with the DeepSeek-style base tokens and (optionally) ParaThinker's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = BASE_SPECIAL + (parathinker_token_names(num_paths) if with_paths else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)


def tiny_config(vocab_size: int, model_type: str = "qwen2", **kw: Any) -> dict[str, Any]:
    cfg = {
        "model_type": model_type,
        "architectures": ["Qwen2ForCausalLM" if model_type == "qwen2" else "LlamaForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "max_segments": 32,
        "hidden_act": "silu",
        "bos_token_id": 0,
        "eos_token_id": 1,
    }
    if model_type == "llama":
        cfg["attention_bias"] = False
    cfg.update(kw)
    return cfg


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
