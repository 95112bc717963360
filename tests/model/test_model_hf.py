"""With zero seg tables the decoder equals transformers' Qwen2/Llama (float32, <= 1e-4)."""

import pytest
import torch

from parathinker.attention.dense import DenseAttention
from parathinker.model import load_model
from parathinker.testing.checkpoints import make_checkpoint

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
YARN = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 96,
        "beta_fast": 32, "beta_slow": 1}


def ours_vs_hf(model_dir, positions):
    from transformers import AutoModelForCausalLM

    ours = load_model(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    torch.manual_seed(0)
    ids = torch.randint(0, ours.config.vocab_size, (2, positions.shape[-1]))
    n = ids.shape[1]
    mask = torch.tril(torch.ones(n, n, dtype=torch.bool)).expand(2, n, n)
    with torch.no_grad():
        a = ours.compute_logits(ours(ids, positions, torch.zeros_like(ids), DenseAttention(mask)))
        b = hf(input_ids=ids, position_ids=positions).logits.float()
    return (a - b).abs().max().item()


@pytest.mark.parametrize("model_type,extra", [
    ("qwen2", {}),
    ("qwen2", {"tie_word_embeddings": True}),
    ("qwen2", {"rope_scaling": YARN}),
    ("llama", {}),
    ("llama", {"rope_scaling": LLAMA3}),
    ("llama", {"attention_bias": True}),
])
def test_logits_equal_transformers(tmp_path, tokenizer, model_type, extra):
    d = make_checkpoint(tmp_path, model_type=model_type, seg_tables=False, tokenizer=tokenizer, **extra)
    positions = torch.arange(200).expand(2, 200)  # beyond the original context for the scalings
    assert ours_vs_hf(d, positions) <= 1e-4


def test_seg_tables_change_keys_and_values_only(tmp_path, tokenizer):
    d = make_checkpoint(tmp_path, tokenizer=tokenizer)
    model = load_model(d)
    ids = torch.arange(10)[None] + 30
    pos = torch.arange(10)[None]
    mask = torch.tril(torch.ones(10, 10, dtype=torch.bool))[None]
    with torch.no_grad():
        seg0 = model(ids, pos, torch.zeros_like(ids), DenseAttention(mask))
        seg3 = model(ids, pos, torch.full_like(ids, 3), DenseAttention(mask))
        # A single token attends only to itself: the seg vector shifts v, so the output changes.
        assert not torch.allclose(seg0, seg3)
        for layer in model.model.layers:
            layer.self_attn.seg_embeddings.weight.zero_()
        zero3 = model(ids, pos, torch.full_like(ids, 3), DenseAttention(mask))
        zero0 = model(ids, pos, torch.zeros_like(ids), DenseAttention(mask))
    assert torch.equal(zero3, zero0)
