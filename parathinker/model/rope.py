"""Rotary position embeddings: plain, llama3-scaled and YaRN (as vLLM and transformers compute it).

Positions are explicit (paths restart at the prompt length), so cos/sin are computed from the
given position ids, never from a running offset.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def _base_inv_freq(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, rs: dict[str, Any]) -> torch.Tensor:
    factor = rs["factor"]
    low_ff, high_ff = rs["low_freq_factor"], rs["high_freq_factor"]
    old_len = rs["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low_ff, old_len / high_ff
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_inv_freq(dim: int, theta: float, rs: dict[str, Any]) -> tuple[torch.Tensor, float]:
    factor = rs["factor"]
    orig = rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(orig / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1 where frequencies are kept as they are
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")
        if mscale and mscale_all:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
        else:
            attention_factor = _yarn_mscale(factor)
    return inv_freq, float(attention_factor)


def rope_parameters(
    head_dim: int, theta: float, rope_scaling: dict[str, Any] | None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [D/2] (float32) and the scale applied to cos/sin."""
    if rope_scaling is None:
        return _base_inv_freq(head_dim, theta), 1.0
    kind = rope_scaling["rope_type"]
    if kind == "llama3":
        return _llama3_inv_freq(_base_inv_freq(head_dim, theta), rope_scaling), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(head_dim, theta, rope_scaling)
    raise ValueError(f"unsupported rope scaling {kind!r}")


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, scale: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [*positions.shape, D], computed in float32 then cast."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., T, H, D]; cos/sin: [..., T, D] (non-interleaved halves, as in Qwen2/Llama)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def flip_rope_constants(inv_freq: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(inv_freq | inv_freq [D], -scale | +scale [D]): what `rope_cos_sin_signed` multiplies by."""
    sign = torch.ones_like(inv_freq)
    return torch.cat((inv_freq, inv_freq)), torch.cat((-sign, sign)) * scale


def rope_cos_sin_signed(positions: torch.Tensor, freqs: torch.Tensor, sin_factor: torch.Tensor,
                        scale: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos as `rope_cos_sin`, and sin with its first half negated (for `apply_rope_flip`), from
    `flip_rope_constants`: the same float32 values, in three ops (int64 positions times float32
    frequencies is computed in float32)."""
    angles = positions[..., None] * freqs
    cos = angles.cos() if scale == 1.0 else angles.cos() * scale
    return cos.to(dtype), (angles.sin() * sin_factor).to(dtype)

def apply_rope_flip(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """`apply_rope` in three ops: rotate_half(x) = flip of x's two halves times (-1 | +1), so
    x * cos + rotate_half(x) * sin = addcmul(x * cos, flip(x), sin_signed). A new tensor, or
    written into `out`."""
    cos, sin_signed = cos.unsqueeze(-2), sin_signed.unsqueeze(-2)
    halves = x.unflatten(-1, (2, x.shape[-1] // 2)).flip(-2).flatten(-2)
    return torch.addcmul(x * cos, halves, sin_signed, out=out)
