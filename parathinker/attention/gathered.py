"""The "gathered" paged backend: the slow, obviously-correct twin every other backend is tested
against. Each sequence's context is copied out of the pool (`attention.pool`) into a new tensor,
then one masked SDPA over it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from parathinker.attention.pool import PagedAttention, PagedKVCache, attend_each, write_kv


class GatheredBackend:
    name = "gathered"
    zeroed_pool = False  # reads only slots written before
    wants_one_run = False  # gathers every slot whatever the runs

    def build_metadata(self, query_lens: Sequence[int],
                       contexts: Sequence[Sequence[tuple[int, int]]],
                       device: torch.device | str) -> PagedAttention:
        return PagedAttention.of_runs(query_lens, contexts, device, self)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_cache: PagedKVCache, meta: PagedAttention) -> torch.Tensor:
        write_kv(kv_cache, layer, k[0], v[0], meta.slot_mapping)
        k_pool, v_pool = kv_cache.k[layer], kv_cache.v[layer]
        out = torch.empty_like(q[0])
        attend_each(q[0], out, meta, range(meta.num_seqs),
                    lambda qs, runs: _attend_gathered(qs, k_pool, v_pool, runs))
        return out[None]


def _attend_gathered(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                     runs: list[tuple[int, int]]) -> torch.Tensor:
    """The slow twin: copy the context's K/V out of the pool, masked SDPA over them."""
    t, _, _ = q.shape
    slots = torch.cat([torch.arange(a, a + n) for a, n in runs]).to(k_pool.device)
    k, v = k_pool[:, slots][None], v_pool[:, slots][None]  # [1, Hkv, C, D]
    c = slots.numel()
    visible = torch.arange(c, device=q.device)[None, :] <= torch.arange(c - t, c, device=q.device)[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k, v, attn_mask=visible,
                                         enable_gqa=True)  # [1, Hq, T, D]
    return out[0].transpose(0, 1)
