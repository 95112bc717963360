"""Prepacked (oneDNN) and int8 linears against plain F.linear on the same weights."""

import pytest
import torch

from parathinker import LLM, SamplingParams
from parathinker.attention.dense import DenseAttention
from parathinker.model import load_model
from parathinker.model.fast_linear import PackedLinear, can_prepack, prepack_linears, quantize_int8


def logits(model, n=24):
    ids = (torch.arange(n)[None] * 7) % 200 + 20
    mask = torch.tril(torch.ones(n, n, dtype=torch.bool))[None]
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(n)[None], ids % 3, DenseAttention(mask)))


@pytest.mark.skipif(not can_prepack(torch.nn.Linear(2, 2)), reason="no oneDNN on this CPU build")
def test_packed_equals_plain(ckpt_dir):
    plain, packed = load_model(ckpt_dir), load_model(ckpt_dir)
    num = prepack_linears(packed)
    assert num == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer + lm_head
    assert isinstance(packed.lm_head, PackedLinear)
    assert (logits(plain) - logits(packed)).abs().max().item() <= 1e-4


def test_int8_is_close_and_generates(ckpt_dir):
    plain, q = load_model(ckpt_dir), load_model(ckpt_dir)
    assert quantize_int8(q) == 15
    a, b = logits(plain), logits(q)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
    llm = LLM(str(ckpt_dir), device="cpu", dtype="float32", linear="int8")
    (out,) = llm.generate(["What is 2+3?"], SamplingParams(num_paths=2, max_path_tokens=8,
                                                            max_summary_tokens=80, temperature=0))
    assert llm.linear_backend == "int8" and len(out.paths) == 2 and out.error is None


@pytest.mark.parametrize("kw,match", [(dict(linear="fast"), "unknown linear backend"),
                                      (dict(linear="packed", dtype="bfloat16"), "float32")])
def test_bad_linear_backend(ckpt_dir, kw, match):
    with pytest.raises(ValueError, match=match):
        LLM(str(ckpt_dir), **{"device": "cpu", "dtype": "float32", **kw})
