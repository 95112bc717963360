"""The one decoder (Qwen2 or Llama) with ParaThinker's thought embeddings.

For a token with segment id s, in every layer: k = RoPE(W_k x + b_k + E[s]), v = W_v x + b_v + E[s],
q = RoPE(W_q x + b_q); E is that layer's `seg_embeddings` [max_segments, head_dim], broadcast over
KV heads (SPEC §4). Module names equal the Hugging Face parameter names, so a checkpoint's
state dict maps onto this module one to one. Every input is explicit: token ids, positions,
segment ids and the attention metadata; the model holds no per-request state.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from parathinker.attention.pool import PagedKVCache as KVCache
from parathinker.config import ModelConfig
from parathinker.model.fused import lean_forward
from parathinker.model.rope import apply_rope, rope_cos_sin, rope_parameters


class AttentionMeta(Protocol):
    """One forward's attention metadata, passed in explicitly: attention.dense.DenseAttention
    and attention.flex.FlexAttention (training, the oracle), attention.pool.PagedAttention (the
    engine, carrying the backend picked when the runner was built)."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_cache: KVCache | None) -> torch.Tensor:
        """q: [B, L, Hq, D], k/v: [B, L, Hkv, D] (after RoPE and thought embedding) -> [B, L, Hq, D]."""
        ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=cfg.o_bias)
        self.seg_embeddings = nn.Embedding(cfg.max_segments, d)
        nn.init.zeros_(self.seg_embeddings.weight)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                segment_ids: torch.Tensor, attn: AttentionMeta,
                kv_cache: KVCache | None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        seg = self.seg_embeddings(segment_ids)[:, :, None, :]  # [B, T, 1, D]
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim) + seg
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim) + seg
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = attn.attend(self.layer, q, k, v, kv_cache)  # [B, T, Hq, D]
        return self.o_proj(o.reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = SelfAttention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                segment_ids: torch.Tensor, attn: AttentionMeta,
                kv_cache: KVCache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, segment_ids, attn, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class ParaThinkerForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        inv_freq, self.rope_scale = rope_parameters(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.gradient_checkpointing = False
        self.fused = False  # model.fused.fuse_for_inference sets it, with seg_table
        self.seg_table: torch.Tensor | None = None

    @property
    def vocab_size(self) -> int:
        return self.model.embed_tokens.num_embeddings

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                segment_ids: torch.Tensor, attn: AttentionMeta,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        """input_ids, positions, segment_ids: [B, L] -> final hidden states [B, L, H]."""
        if self.fused:
            return lean_forward(self, input_ids, positions, segment_ids, attn, kv_cache)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.rope_scale, x.dtype)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, segment_ids, attn, kv_cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, segment_ids, attn, kv_cache)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits over the whole embedding table (no row is masked, SPEC §5)."""
        return self.lm_head(hidden).float()

    def resize_token_embeddings(self, new_size: int) -> None:
        """Grow the embedding (and untied LM head) to `new_size` rows; new rows start at the mean
        of the existing rows, so new tokens begin as an average token."""
        old = self.model.embed_tokens
        if new_size <= old.num_embeddings:
            return

        def grow(weight: torch.Tensor) -> nn.Parameter:
            extra = weight.data.mean(0, keepdim=True).expand(new_size - weight.shape[0], -1)
            return nn.Parameter(torch.cat([weight.data, extra.clone()], 0))

        self.model.embed_tokens = nn.Embedding(new_size, old.embedding_dim, device=old.weight.device,
                                               dtype=old.weight.dtype)
        self.model.embed_tokens.weight = grow(old.weight)
        if self.config.tie_word_embeddings:
            self.lm_head = nn.Linear(old.embedding_dim, new_size, bias=False)
            self.lm_head.weight = self.model.embed_tokens.weight
        else:
            head = self.lm_head
            self.lm_head = nn.Linear(old.embedding_dim, new_size, bias=False,
                                     device=head.weight.device, dtype=head.weight.dtype)
            self.lm_head.weight = grow(head.weight)
        self.config = self.config.with_overrides(vocab_size=new_size)
