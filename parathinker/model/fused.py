"""The lean decode layer: a loaded model's layers fused for inference, in few ops per layer.

`fuse_for_inference(model)` (called by `fast_linear.apply_linear_backend`, before the linears
are swapped, so the packed and int8 backends apply to the fused ones) replaces, in every layer,
q_proj, k_proj, v_proj by one `qkv_proj` (rows q | k | v, biases alike) and gate_proj, up_proj by
one `gate_up_proj` (rows gate | up), and stacks every layer's thought embeddings into one table
`model.seg_table` [num_layers, max_segments, head_dim] (and the rotary's `model.rope_constants`).
A fused model computes the same function as the unfused one (`lean_forward`, one flat forward):

  once per step   cos, signed sin (rope.rope_cos_sin_signed); E = seg_table[:, segment_ids]
  per layer       h = rms_norm(x) (F.rms_norm, one fused kernel on CUDA)
                  qkv = W_qkv h + b_qkv; k|v += E[layer] (one in-place add on the k|v columns)
                  q|k = RoPE(q|k) (rope.apply_rope_flip: three ops for q and k together)
                  x = x + W_o attend(q, k, v) (linear and residual in one op: `linear_add`)
                  h = rms_norm(x); gu = W_gate_up h; x = x + W_down (silu(gate) * up)
                  (CPU, float32: all but attend in chunks of LAYER_CHUNK_ROWS rows: the same values)

Numerics: float32 equals the unfused model to rounding. F.rms_norm multiplies by the weight in
float32 and rounds once; the unfused (Hugging Face) RMSNorm rounds the normalized x to bf16/fp16
before multiplying, so a half-precision output may differ by one ulp. A fused model is for
inference only: the table is a copy taken at fusion, and `hf_state_dict` gives back the
Hugging Face names (checkpoint.save_model) as long as the linears are plain.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from parathinker.model.rope import apply_rope_flip, flip_rope_constants, rope_cos_sin_signed

# (fused name, its parts in row order), per module of a layer
FUSED = {"self_attn": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
         "mlp": ("gate_up_proj", ("gate_proj", "up_proj"))}
PARTS = dict(FUSED.values())  # fused name -> its parts
# On CPU in float32, a step of more rows runs everything but attention in chunks of this many
# rows: one [T, 2I] gate/up output (or [T, Hq + Hkv, D] rotary output) is a fresh mapping of the
# allocator, whose page faults cost more than computing it (a 4K prefill of the small model:
# ~100K faults fewer, ~10 % faster; BENCHMARKS.md, "Prefill in row chunks"); a chunk's buffers
# are reused and in cache. Not in bfloat16/float16: half the bytes, and oneDNN's AMX matmuls
# there lose more on short calls than the faults cost (1K-4K prefills 8-20 % slower chunked,
# 8K 5 % faster: one pass kept).
LAYER_CHUNK_ROWS = 256


def _concat(parts: list[nn.Linear]) -> nn.Linear:
    w = torch.cat([p.weight.detach() for p in parts], 0)
    has_bias = parts[0].bias is not None
    fused = nn.Linear(w.shape[1], w.shape[0], bias=has_bias, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        fused.weight.copy_(w)
        if has_bias:
            fused.bias.copy_(torch.cat([p.bias.detach() for p in parts], 0))
    return fused.requires_grad_(False)


def fuse_for_inference(model: nn.Module) -> bool:
    """Fuse `model` (a ParaThinkerForCausalLM) in place; -> whether anything was fused (False for
    a model fused already). Its linears must still be plain nn.Linear."""
    if getattr(model, "fused", False):
        return False
    for layer in model.model.layers:
        for owner_name, (fused_name, names) in FUSED.items():
            owner = getattr(layer, owner_name)
            parts = [getattr(owner, n) for n in names]
            if any(type(p) is not nn.Linear for p in parts):
                raise ValueError("fuse_for_inference needs plain nn.Linear layers: fuse before "
                                 "prepacking or quantizing (apply_linear_backend does)")
            setattr(owner, fused_name, _concat(parts))
            for n in names:
                delattr(owner, n)
    model.seg_table = torch.stack([layer.self_attn.seg_embeddings.weight.detach()
                                   for layer in model.model.layers])
    model.rope_constants = flip_rope_constants(model.inv_freq, model.rope_scale)
    model.fused = True
    return True


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict under the Hugging Face names: a fused linear split back into its parts."""
    state = model.state_dict()
    if not getattr(model, "fused", False):
        return state
    cfg = model.config
    sizes = {"qkv_proj": [cfg.num_attention_heads * cfg.head_dim,
                          cfg.num_key_value_heads * cfg.head_dim,
                          cfg.num_key_value_heads * cfg.head_dim],
             "gate_up_proj": [cfg.intermediate_size] * 2}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        owner, _, leaf = key.rpartition(".")  # e.g. model.layers.0.self_attn.qkv_proj, weight
        prefix, _, module = owner.rpartition(".")
        fused = PARTS.get(module)
        if fused is None:
            out[key] = value
            continue
        if leaf not in ("weight", "bias"):
            raise ValueError(f"{key}: a prepacked or quantized model cannot be saved; save it "
                             "before apply_linear_backend")
        for name, part in zip(fused, value.split(sizes[module], 0)):
            out[f"{prefix}.{name}.{leaf}"] = part
    return out


def linear_add(linear: nn.Module, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """linear(x) + other, in one op where the backend has one: fast_linear.PackedLinear's
    `forward_add` (oneDNN's add post-op), addmm for a plain nn.Linear without bias."""
    if hasattr(linear, "forward_add"):
        return linear.forward_add(x, other)
    if type(linear) is nn.Linear and linear.bias is None:
        out = torch.addmm(other.reshape(-1, linear.out_features),
                          x.reshape(-1, linear.in_features), linear.weight.t())
        return out.view(other.shape)
    return linear(x) + other


def _lean_layer(layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                seg: torch.Tensor, attn: Any, kv_cache: Any) -> torch.Tensor:
    """x [B, T, H] -> [B, T, H]; seg [B, T, D] this layer's thought embeddings per token. On CPU
    in float32, more than LAYER_CHUNK_ROWS rows go through everything but the attention in
    chunks of that many (each row's norms, projections, rotary and MLP are its own): the same
    values."""
    a = layer.self_attn
    b, t, _ = x.shape
    one_pass = t <= LAYER_CHUNK_ROWS or x.device.type != "cpu" or x.dtype != torch.float32
    if one_pass:
        qk, v = _qk_v(layer, x, cos, sin, seg)
    else:
        chunks = [slice(r, r + LAYER_CHUNK_ROWS) for r in range(0, t, LAYER_CHUNK_ROWS)]
        qk = x.new_empty(b, t, a.num_heads + a.num_kv_heads, a.head_dim)
        v = x.new_empty(b, t, a.num_kv_heads, a.head_dim)
        for c in chunks:
            _qk_v(layer, x[:, c], cos[:, c], sin[:, c], seg[:, c], (qk[:, c], v[:, c]))
    o = attn.attend(a.layer, qk[:, :, :a.num_heads], qk[:, :, a.num_heads:], v, kv_cache)
    o = o.reshape(b, t, -1)  # [B, T, Hq * D]
    if one_pass:
        return _mlp(layer, linear_add(a.o_proj, o, x))
    out = torch.empty_like(x)
    for c in chunks:
        out[:, c] = _mlp(layer, linear_add(a.o_proj, o[:, c], x[:, c]))
    return out


def _qk_v(layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
          seg: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None,
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotated q|k [B, T, Hq + Hkv, D] and v [B, T, Hkv, D] of x [B, T, H]: new tensors (v a
    view of the projection), or written into `out`'s two."""
    a = layer.self_attn
    b, t, _ = x.shape
    hq, hkv, d = a.num_heads, a.num_kv_heads, a.head_dim
    qkv = a.qkv_proj(_rms_norm(layer.input_layernorm, x))
    qkv[..., hq * d:].view(b, t, 2 * hkv, d).add_(seg[:, :, None])  # k and v += E[s]
    qk = qkv[..., :(hq + hkv) * d].view(b, t, hq + hkv, d)
    v = qkv[..., (hq + hkv) * d:].view(b, t, hkv, d)
    if out is None:
        return apply_rope_flip(qk, cos, sin), v
    apply_rope_flip(qk, cos, sin, out=out[0])
    out[1].copy_(v)
    return out


def _mlp(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x + W_down (silu(gate) * up) of rms_norm(x); x [B, T, H]."""
    gate_up = layer.mlp.gate_up_proj(_rms_norm(layer.post_attention_layernorm, x))
    i = gate_up.shape[-1] // 2
    return linear_add(layer.mlp.down_proj, F.silu(gate_up[..., :i]).mul_(gate_up[..., i:]), x)


def lean_forward(model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
                 segment_ids: torch.Tensor, attn: Any, kv_cache: Any) -> torch.Tensor:
    """A fused model's forward (ParaThinkerForCausalLM.forward's contract)."""
    x = model.model.embed_tokens(input_ids)
    cos, sin = rope_cos_sin_signed(positions, *model.rope_constants, model.rope_scale, x.dtype)
    segs = model.seg_table[:, segment_ids]  # [L, B, T, D]
    for layer, seg in zip(model.model.layers, segs):
        x = _lean_layer(layer, x, cos, sin, seg, attn, kv_cache)
    return _rms_norm(model.model.norm, x)


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An RMSNorm module's function as one op (F.rms_norm; numerics in the module docstring)."""
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.eps)
