"""The lean decode layer (model.fused) against the unfused model it was built from, and its pieces
(F.rms_norm, the flip rotary, linear + residual) against the formulas typed in here."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from parathinker.attention.dense import DenseAttention
from parathinker.attention.paged import backend_for
from parathinker.attention.pool import PagedKVCache
from parathinker.model import load_model
from parathinker.model.checkpoint import save_model
from parathinker.model.fast_linear import apply_linear_backend, can_prepack
from parathinker.model import fused as fused_module
from parathinker.model.fused import fuse_for_inference, linear_add
from parathinker.model.rope import (apply_rope_flip, flip_rope_constants, rope_cos_sin,
                                    rope_cos_sin_signed, rope_parameters)

needs_onednn = pytest.mark.skipif(not can_prepack(nn.Linear(2, 2)), reason="no oneDNN here")


def inputs(b=2, n=20, seed=0):
    """Token ids, positions that restart (a path after its prompt, SPEC §4, and the reference
    layout's shifted ones), segment ids of every kind, a causal mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 200, (b, n), generator=g)
    positions = torch.cat([torch.arange(8), torch.arange(8, 14), torch.arange(8, 14) + 3])[None]
    segments = torch.tensor([0] * 8 + [1] * 6 + [2] * 6)[None]
    mask = torch.tril(torch.ones(n, n, dtype=torch.bool))[None].expand(b, n, n)
    return ids, positions.expand(b, n), (segments + torch.arange(b)[:, None]) % 5, mask


def hidden(model, ids, positions, segments, mask):
    with torch.inference_mode():
        return model(ids, positions, segments, DenseAttention(mask))


@pytest.mark.parametrize("rope_scaling", [None, {"rope_type": "yarn", "factor": 4.0,
                                                 "original_max_position_embeddings": 64}])
def test_fused_equals_unfused_float32(ckpt_dir, rope_scaling):
    overrides = {"rope_scaling": rope_scaling} if rope_scaling else None
    plain, fused = load_model(ckpt_dir, config_overrides=overrides), load_model(ckpt_dir, config_overrides=overrides)
    assert fuse_for_inference(fused) and not fuse_for_inference(fused)  # once only
    attn = fused.model.layers[0].self_attn
    assert not hasattr(attn, "q_proj") and attn.qkv_proj.out_features == (
        (attn.num_heads + 2 * attn.num_kv_heads) * attn.head_dim)
    assert any(layer.self_attn.seg_embeddings.weight.abs().sum() > 0 for layer in plain.model.layers)
    x = inputs()
    assert (hidden(plain, *x) - hidden(fused, *x)).abs().max().item() <= 1e-5


def record_rows(monkeypatch, *names):
    """Chunks of 7 rows (model.fused.LAYER_CHUNK_ROWS), and a list that records (name, rows) of
    each call of the named functions of model.fused."""
    calls = []
    for name in names:
        monkeypatch.setattr(fused_module, name,
                            lambda layer, h, *rest, one=getattr(fused_module, name), name=name:
                            calls.append((name, h.shape[1])) or one(layer, h, *rest))
    monkeypatch.setattr(fused_module, "LAYER_CHUNK_ROWS", 7)
    return calls


def test_fused_layer_in_row_chunks_equals_unfused(ckpt_dir, monkeypatch):
    """On CPU in float32 a step of more than LAYER_CHUNK_ROWS rows runs all but attention in chunks
    (here chunks of 7, 7 and 6 of 20 rows, in each of the 2 sequences): the same values as the
    unfused model and as the fused model in one pass."""
    plain, fused = load_model(ckpt_dir), load_model(ckpt_dir)
    fuse_for_inference(fused)
    x = inputs()
    whole = hidden(fused, *x)
    calls = record_rows(monkeypatch, "_qk_v", "_mlp")
    chunked = hidden(fused, *x)
    assert calls == [(name, n) for name in ("_qk_v", "_mlp") for n in (7, 7, 6)] * \
        fused.config.num_hidden_layers
    assert (hidden(plain, *x) - chunked).abs().max().item() <= 1e-5
    assert (whole - chunked).abs().max().item() <= 1e-5


def test_fused_layer_in_bfloat16_runs_in_one_pass(ckpt_dir, monkeypatch):
    """The row chunks are for float32 (model.fused.LAYER_CHUNK_ROWS): bfloat16 stays one pass."""
    fused = load_model(ckpt_dir, dtype=torch.bfloat16)
    fuse_for_inference(fused)
    calls = record_rows(monkeypatch, "_mlp")
    hidden(fused, *inputs())
    assert calls == [("_mlp", 20)] * fused.config.num_hidden_layers


def test_fused_equals_unfused_paged_prefill_then_decode(ckpt_dir):
    """Through the paged pool: a prefill of 12 tokens, then 3 sequences decoding one token each
    over shared prompt slots; the pool's K/V and the outputs agree."""
    models = [load_model(ckpt_dir), load_model(ckpt_dir)]
    fuse_for_inference(models[1])
    cfg = models[0].config
    outs, pools = [], []
    for model in models:
        backend = backend_for("runs", "cpu")
        cache = PagedKVCache.allocate(cfg.num_hidden_layers, 64, cfg.num_key_value_heads,
                                      cfg.head_dim, torch.float32, "cpu")
        with torch.inference_mode():
            meta = backend.build_metadata([12], [[(0, 12)]], "cpu")
            ids = (torch.arange(12)[None] * 5) % 200
            a = model(ids, torch.arange(12)[None], torch.zeros(1, 12, dtype=torch.long), meta, cache)
            meta = backend.build_metadata([1, 1, 1], [[(0, 12), (20 + 4 * s, 1)] for s in range(3)],
                                          "cpu")
            b = model(torch.tensor([[7, 8, 9]]), torch.tensor([[12, 12, 12]]),
                      torch.tensor([[1, 2, 3]]), meta, cache)
        outs.append(torch.cat([a, b], 1))
        pools.append(cache)
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-5
    slots = [*range(12), 20, 24, 28]
    for name in ("k", "v"):
        a, b = (getattr(p, name)[:, :, slots] for p in pools)
        assert (a - b).abs().max().item() <= 1e-5


def test_fused_bfloat16_is_close(ckpt_dir):
    plain = load_model(ckpt_dir, dtype=torch.bfloat16)
    fused = load_model(ckpt_dir, dtype=torch.bfloat16)
    fuse_for_inference(fused)
    x = inputs()
    a, b = hidden(plain, *x).float(), hidden(fused, *x).float()
    assert (a - b).abs().max().item() <= 0.05 * a.abs().max().item()


@needs_onednn
@pytest.mark.parametrize("backend", ["packed", "int8", "plain"])
def test_linear_backends_apply_to_the_fused_linears(ckpt_dir, backend):
    plain, fast = load_model(ckpt_dir), load_model(ckpt_dir)
    assert apply_linear_backend(fast, backend) == backend
    assert fast.fused and type(fast.model.layers[0].mlp.gate_up_proj) is not nn.Linear or \
        backend == "plain"
    x = inputs()
    a, b = hidden(plain, *x), hidden(fast, *x)
    if backend == "int8":
        assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
    else:
        assert (a - b).abs().max().item() <= 1e-4


def test_rms_norm_matches_the_hf_formula():
    """HF: normalize in float32, round to the dtype, then times the weight."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 96, generator=g) * 3, torch.rand(96, generator=g) + 0.5
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2.0**-7), (torch.float16, 2.0**-10)):
        xd, wd = x.to(dtype), w.to(dtype)
        xf = xd.float()
        hf = wd * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
        ours = F.rms_norm(xd, (96,), wd, 1e-6)
        assert ours.dtype == dtype
        rel = ((ours.float() - hf.float()).abs() / hf.float().abs().clamp(min=1e-3)).max().item()
        assert rel <= 2 * tol, (dtype, rel)  # at most one rounding of the dtype apart


def test_flip_rotary_equals_rotate_half():
    theta, d = 10000.0, 16
    inv_freq, scale = rope_parameters(d, theta, None)
    pos = torch.tensor([[0, 1, 5, 5, 100, 4095]])
    x = torch.randn(1, 6, 3, d)
    cos, sin = rope_cos_sin_signed(pos, *flip_rope_constants(inv_freq, scale), scale, torch.float32)
    angle = pos[..., None].float() * (1.0 / theta ** (torch.arange(0, d, 2).float() / d))
    c, s = torch.cat([angle.cos()] * 2, -1)[:, :, None], torch.cat([angle.sin()] * 2, -1)[:, :, None]
    rotated = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    assert torch.allclose(apply_rope_flip(x, cos, sin), x * c + rotated * s, atol=1e-6)


@pytest.mark.parametrize("rope_scaling", [None, {"rope_type": "yarn", "factor": 4.0,
                                                 "original_max_position_embeddings": 64}])
def test_signed_cos_sin_are_the_plain_ones_exactly(rope_scaling):
    inv_freq, scale = rope_parameters(16, 10000.0, rope_scaling)
    pos = torch.tensor([[0, 1, 5, 100, 4095, 70000]])
    for dtype in (torch.float32, torch.bfloat16):
        cos, sin = rope_cos_sin(pos, inv_freq, scale, dtype)
        cos2, sin2 = rope_cos_sin_signed(pos, *flip_rope_constants(inv_freq, scale), scale, dtype)
        assert torch.equal(cos, cos2) and torch.equal(sin[..., 8:], sin2[..., 8:])
        assert torch.equal(-sin[..., :8], sin2[..., :8])


@needs_onednn
def test_linear_add_equals_linear_plus_residual():
    g = torch.Generator().manual_seed(0)
    x, res = torch.randn(2, 5, 32, generator=g), torch.randn(2, 5, 48, generator=g)
    for bias in (False, True):
        lin = nn.Linear(32, 48, bias=bias)
        expected = x @ lin.weight.T + (lin.bias if bias else 0) + res
        model = nn.Sequential(lin)
        for backend in ("plain", "packed"):
            if backend == "packed":
                from parathinker.model.fast_linear import prepack_linears
                prepack_linears(model)
            with torch.inference_mode():
                out = linear_add(model[0], x, res)
            assert out.shape == res.shape
            assert (out - expected).abs().max().item() <= 1e-5, (bias, backend)


def test_fused_checkpoint_saves_hf_names(ckpt_dir, tmp_path):
    plain, fused = load_model(ckpt_dir), load_model(ckpt_dir)
    fuse_for_inference(fused)
    save_model(fused, tmp_path / "out")
    again = load_model(tmp_path / "out")
    expected = plain.state_dict()
    got = again.state_dict()
    assert set(got) == set(expected) and "model.layers.0.self_attn.q_proj.weight" in got
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


@needs_onednn
def test_packed_model_save_is_refused(ckpt_dir, tmp_path):
    model = load_model(ckpt_dir)
    apply_linear_backend(model, "packed")
    with pytest.raises(ValueError, match="save it before apply_linear_backend"):
        save_model(model, tmp_path / "out")
