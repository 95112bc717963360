"""Tiny tokenizers and checkpoints built from scratch, offline, in well under a second: for the
tests, the CPU demo and anyone who wants a model to poke at without downloading one.

A byte-level BPE is trained on a small corpus with the DeepSeek-R1-Distill base tokens and the
ParaThinker control tokens added as special tokens, exactly the names SPEC §2 looks up.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from parathinker.config import ModelConfig
from parathinker.model import ParaThinkerForCausalLM, save_model
from parathinker.spec.tokens import parathinker_token_names

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
BASE_SPECIAL = [BOS, EOS, "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 300, num_paths: int = 8,
                    with_paths: bool = True) -> Any:
    """A byte-level BPE (a transformers fast tokenizer) that prepends BOS, like DeepSeek's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = BASE_SPECIAL + (parathinker_token_names(num_paths) if with_paths else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)


def tiny_config(vocab_size: int, model_type: str = "qwen2", **kw: Any) -> dict[str, Any]:
    """config.json content of a tiny Qwen2 or Llama decoder."""
    cfg = {
        "model_type": model_type,
        "architectures": ["Qwen2ForCausalLM" if model_type == "qwen2" else "LlamaForCausalLM"],
        "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": 4096, "tie_word_embeddings": False, "max_segments": 32,
        "hidden_act": "silu", "bos_token_id": 0, "eos_token_id": 1,
    }
    if model_type == "llama":
        cfg["attention_bias"] = False
    cfg.update(kw)
    return cfg


def random_checkpoint(out_dir: str | Path, config: dict[str, Any], tokenizer: Any = None,
                      seed: int = 0, seg_std: float = 0.02) -> ParaThinkerForCausalLM:
    """Random weights (PyTorch's default init, seg tables ~ N(0, seg_std)) saved as a HF
    checkpoint directory with the tokenizer; returns the model."""
    torch.manual_seed(seed)
    model = ParaThinkerForCausalLM(ModelConfig.from_dict(config))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.seg_embeddings.weight.normal_(0, seg_std)
    save_model(model, out_dir, tokenizer)
    return model
