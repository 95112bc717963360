"""The "flex" paged backend (the CUDA default; also compiles on CPU): FlexAttention over the paged
KV pool (`parathinker.attention.pool`).

K/V are the whole pool of one layer, `[1, Hkv, num_slots, D]`, broadcast over a query batch of
one row per sequence; nothing is gathered. Which pool slots a sequence reads is a `BlockMask`
built directly (`BlockMask.from_kv_blocks`) from the runs of its context, cut into pages of
`KV_BLOCK` slots:

- a page covered entirely by the sequence's context and holding none of its new tokens is a
  *full* block: the kernel reads it with no mask at all (almost every page of a long context);
- every other page it touches (a run's first or last page: the partial last block of the prompt
  or of a path, in the middle of a summary's context; or a page holding its own new tokens when
  it has several) is a *masked* block, where `mask_mod` decides per slot with two per-slot
  tables written this step:
    member[w, slot]  bit b % 64 of word w = b // 64 is set iff slot is in sequence b's context
                     (only for slots of masked pages: O(masked pages), not O(context));
    tok[slot]        flat index of the new token written at slot this step, else -1: sequence
                     b's query t (flat qo_indptr[b] + t) does not see its own later new tokens.
  Both are exact for arbitrary runs (a slot may be in any number of contexts; a page may be
  shared in part by several sequences), as long as the runs of one context are disjoint.

GQA: the G = Hq / Hkv query heads of a KV head are folded into the query axis ([S, Hkv, Q*G, D],
row t*G + g, as the runs backend folds them) rather than passed with enable_gqa=True: FlexAttention
uses its decoding kernel (one read of each K/V page for all G heads) only for a power-of-two G, and
Qwen2.5's G (6 for 1.5B, 7 for 7B) is not one; folded, G is 1 and the decoding kernel serves every
step whose sequences have < 128 / G new tokens.

Compiles: one compiled `flex_attention` per distinct shape, and shapes are padded to powers of two
so that a decode loop compiles a handful of times, not every step. What recompiles: the sequence
count S (padded), the longest new-token count (padded), the largest number of pages of one context
(padded, at least MIN_PAGES), the pool size, G and D, dtype and device. A decode loop of P paths
recompiles when the longest context crosses a power of two of pages; it never recompiles because a
table's contents changed (the mask_mod's tables are graph inputs, not constants).

Kernel block sizes (CUDA): the sparse KV block is KV_BLOCK = 16, the engine's block size, so a
page never mixes slots of two engine blocks (a larger one would read, then mask, other sequences'
slots inside every page of a fragmented pool). Triton's kernels need the sparse block to be a
multiple of their BLOCK_N (the decoding kernel clamps BLOCK_N to it; the prefill kernel's default
BLOCK_N is 64 or 128 and raises, or skips its configs), so BLOCK_N = 16 is passed in kernel_options,
as vLLM's FlexAttention backend does for 16-slot pages. The sparse Q block is 128 rows, a multiple
of every BLOCK_M either kernel picks (the decoding kernel's is next_pow2(Q*G) >= 16 < 128).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch

from parathinker.attention.pool import PagedAttention, PagedKVCache, write_kv

KV_BLOCK = 16  # slots per sparse KV block (the engine's block_size); see the module docstring
Q_BLOCK = 128  # folded query rows per sparse Q block
MIN_PAGES = 64  # smallest padded page count per context (1K slots): fewer compiles when short
KERNEL_OPTIONS = {"BLOCK_N": KV_BLOCK}  # the kernels' KV tile must divide the sparse KV block
# Compiled flex_attention caches one graph per bucketed shape; dynamo's default limit (8) would be
# reached by a long run (sequence-count x query x page buckets) and fall back to eager flex,
# which materializes scores over the whole pool. Raised once, when the backend is first used.
RECOMPILE_LIMIT = 64


def _bucket(n: int, minimum: int = 1) -> int:
    """The next power of two >= max(n, minimum)."""
    n = max(n, minimum)
    return 1 << (n - 1).bit_length()


class FlexPagedBackend:
    name = "flex"
    zeroed_pool = True  # its kernels read whole pages, masked (PagedKVCache.allocate)
    wants_one_run = False  # reads through a page table: runs cost nothing, moves a copy

    def build_metadata(self, query_lens: Sequence[int],
                       contexts: Sequence[Sequence[tuple[int, int]]],
                       device: torch.device | str) -> PagedAttention:
        meta = PagedAttention.of_runs(query_lens, contexts, device, self)
        meta.state = build_flex_state(meta, device)
        return meta

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_cache: PagedKVCache, meta: PagedAttention) -> torch.Tensor:
        write_kv(kv_cache, layer, k[0], v[0], meta.slot_mapping)
        return flex_paged_attend(q, kv_cache.k[layer], kv_cache.v[layer], meta)


@dataclass
class FlexPagedState:
    """What the flex backend builds once per step and every layer reuses."""

    num_seqs: int  # S, padded: the query batch
    num_q: int  # new tokens per sequence, padded: Q
    q_index: torch.Tensor  # [S_pad, Q] flat token gathered into each query row (padding: a copy)
    out_index: torch.Tensor  # [N] row b * Q + t of each flat token
    q_lens: torch.Tensor  # [S_pad] new tokens per sequence (0 for padding)
    kv_num_blocks: torch.Tensor  # [S_pad] masked pages per sequence
    kv_indices: torch.Tensor  # [S_pad, P] masked pages (pool page = slot // KV_BLOCK)
    full_kv_num_blocks: torch.Tensor  # [S_pad] full pages per sequence
    full_kv_indices: torch.Tensor  # [S_pad, P] full pages
    member_index: torch.Tensor  # [M] (word << 40) + slot of each member word to set
    member_bits: torch.Tensor  # [M] int64: bit b % 64 for each sequence b whose context has it
    slot_mapping: torch.Tensor  # [N] slots of the new tokens
    qo_start: torch.Tensor  # [S_pad] int32 first flat token of each sequence
    qo_end: torch.Tensor  # [S_pad] int32 one past its last
    num_words: int  # W = S_pad / 64 rounded up
    block_masks: dict[tuple[int, int], Any] = field(default_factory=dict, repr=False)

    def block_mask(self, g: int, num_slots: int) -> Any:
        """The BlockMask over [S_pad, Hkv, Q*G, num_slots] (the query axis folds G heads); the
        first layer makes it, the others reuse it."""
        if (g, num_slots) not in self.block_masks:
            self.block_masks[g, num_slots] = self._make_block_mask(g, num_slots)
        return self.block_masks[g, num_slots]

    def _make_block_mask(self, g: int, num_slots: int) -> Any:
        from torch.nn.attention.flex_attention import BlockMask

        # Per-slot tables, sized by the pool (so their shapes never change between steps).
        device = self.slot_mapping.device
        length = -(-num_slots // KV_BLOCK) * KV_BLOCK
        member = torch.zeros(self.num_words * length, dtype=torch.long, device=device)
        word, slot = self.member_index // (1 << 40), self.member_index % (1 << 40)
        member[word * length + slot] = self.member_bits
        member = member.view(self.num_words, length)  # [W, L]
        tok = torch.full((length,), -1, dtype=torch.int32, device=device)  # [L]
        tok[self.slot_mapping] = torch.arange(len(self.slot_mapping), dtype=torch.int32,
                                              device=device)

        rows = self.num_q * g
        num_q_blocks = -(-rows // Q_BLOCK)
        # Query blocks past a sequence's own rows read nothing (their output is never used).
        live = (torch.arange(num_q_blocks, device=self.q_lens.device)[None, :] * Q_BLOCK
                < self.q_lens[:, None] * g)  # [S_pad, QB]

        pages = -(-num_slots // KV_BLOCK)

        def per_q_block(num: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if device.type == "cpu" and idx.shape[-1] < pages:
                # Inductor's CPU lowering asserts that the index table spans the whole KV length
                # (CUDA does not); the padding is never read (counts stop before it).
                idx = torch.nn.functional.pad(idx, (0, pages - idx.shape[-1]))
            n = torch.where(live, num[:, None], 0).to(torch.int32)[:, None]  # [S_pad, 1, QB]
            i = idx[:, None, None, :].expand(-1, 1, num_q_blocks, -1)  # [S_pad, 1, QB, P]
            i = i.contiguous()
            return n, i

        qo_start, qo_end = self.qo_start, self.qo_end

        def mask_mod(b, h, q_idx, kv_idx):
            n = qo_start[b] + q_idx // g  # this query's flat token
            m = tok[kv_idx]
            causal = (m <= n) | (m >= qo_end[b])  # not one of this sequence's later new tokens
            bit = (member[b // 64, kv_idx] >> (b % 64)) & 1
            return causal & (bit != 0)

        kv_num, kv_idx = per_q_block(self.kv_num_blocks, self.kv_indices)
        full_num, full_idx = per_q_block(self.full_kv_num_blocks, self.full_kv_indices)
        return BlockMask.from_kv_blocks(
            kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(Q_BLOCK, KV_BLOCK), mask_mod=mask_mod,
            seq_lengths=(rows, num_slots), compute_q_blocks=False)


def build_flex_state(meta: PagedAttention, device: torch.device | str) -> FlexPagedState:
    """The block mask's pages and the member bits of one step, from the runs (module docstring).
    Computed with vectorized torch ops on the host, where the metadata's lists are: O(pages of
    all contexts) work, no Python loop over sequences, runs, pages or tokens; the results are
    moved to the device once, and the per-slot tables are filled there by the first layer."""
    num_seqs = meta.num_seqs
    qo = torch.tensor(meta.qo_indptr)  # [S+1]
    q_lens = qo[1:] - qo[:-1]  # [S]
    s_pad, q_pad = _bucket(num_seqs), _bucket(int(q_lens.max()))
    runs = _Runs.of(meta, q_lens)
    u_seq, u_page, is_masked = _pages(runs, q_lens)
    counts, indices = _pack(u_seq, u_page, is_masked, s_pad)
    member_index, member_bits = _member_bits(runs, u_seq[is_masked], u_page[is_masked])

    q_lens_pad = torch.zeros(s_pad, dtype=torch.long)
    q_lens_pad[:num_seqs] = q_lens
    qo_start = torch.zeros(s_pad, dtype=torch.long)
    qo_start[:num_seqs] = qo[:-1]
    t = torch.arange(q_pad)
    q_index = torch.where(t < q_lens_pad[:, None], qo_start[:, None] + t, 0)  # [S_pad, Q]
    seq_of_tok = torch.repeat_interleave(torch.arange(num_seqs), q_lens)  # [N]
    out_index = seq_of_tok * q_pad + torch.arange(len(seq_of_tok)) - qo[:-1][seq_of_tok]

    def dev(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return x.to(device=device, dtype=dtype or x.dtype)

    return FlexPagedState(
        num_seqs=s_pad, num_q=q_pad, q_index=dev(q_index), out_index=dev(out_index),
        q_lens=dev(q_lens_pad), kv_num_blocks=dev(counts[:, 1], torch.int32),
        kv_indices=dev(indices[:, 1]), full_kv_num_blocks=dev(counts[:, 0], torch.int32),
        full_kv_indices=dev(indices[:, 0]), member_index=dev(member_index),
        member_bits=dev(member_bits), slot_mapping=dev(meta.slot_mapping),
        qo_start=dev(qo_start, torch.int32), qo_end=dev(qo_start + q_lens_pad, torch.int32),
        num_words=_bucket(s_pad, 64) // 64)


@dataclass
class _Runs:
    """The step's runs as host tensors [R]: sequence, first slot, end slot, place in context."""

    seq: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor
    offset: torch.Tensor  # position of the run's first slot in its sequence's context
    ctx_len: torch.Tensor  # [S] context length of each sequence

    @classmethod
    def of(cls, meta: PagedAttention, q_lens: torch.Tensor) -> _Runs:
        kv = torch.tensor(meta.kv_indptr)  # [S+1]
        start, length = torch.tensor(meta.run_start), torch.tensor(meta.run_len)
        seq = torch.repeat_interleave(torch.arange(meta.num_seqs), kv[1:] - kv[:-1])
        cum = torch.cumsum(length, 0)
        base = torch.cat([cum.new_zeros(1), cum])[kv]  # [S+1] context offsets, concatenated
        return cls(seq, start, start + length, cum - length - base[:-1][seq], base[1:] - base[:-1])


def _pages(runs: _Runs, q_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One entry per (sequence, page) its context touches, sorted: sequence [U], page [U], and
    whether the page needs mask_mod [U] (not wholly in the context, or holding new tokens of a
    sequence with several)."""
    first, last = runs.start // KV_BLOCK, (runs.end - 1) // KV_BLOCK
    num = last - first + 1
    run = torch.repeat_interleave(torch.arange(len(num)), num)  # [E] every (run, page) pair
    page = first[run] + torch.arange(len(run)) - (torch.cumsum(num, 0) - num)[run]
    lo = torch.maximum(runs.start[run], page * KV_BLOCK)
    hi = torch.minimum(runs.end[run], page * KV_BLOCK + KV_BLOCK)
    seq = runs.seq[run]
    ctx_hi = runs.offset[run] + hi - runs.start[run]  # end of the piece, in context positions
    is_new = (ctx_hi > (runs.ctx_len - q_lens)[seq]) & (q_lens[seq] > 1)
    num_pages = int(last.max()) + 1
    key, inv = torch.unique(seq * num_pages + page, return_inverse=True)
    cover = torch.zeros(len(key), dtype=torch.long).index_add_(0, inv, hi - lo)
    has_new = torch.zeros(len(key), dtype=torch.long).index_add_(0, inv, is_new.long()) > 0
    return key // num_pages, key % num_pages, (cover < KV_BLOCK) | has_new


def _pack(seq: torch.Tensor, page: torch.Tensor, is_masked: torch.Tensor,
          s_pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries -> counts [S_pad, 2] and page lists [S_pad, 2, P] (index 0 full, 1 masked)."""
    group = seq * 2 + is_masked.long()  # entries arrive sorted by (sequence, page)
    counts = torch.bincount(group, minlength=2 * s_pad).view(s_pad, 2)
    order = torch.argsort(group, stable=True)  # pages stay ascending within a group
    g = group[order]
    pos = torch.arange(len(order)) - (torch.cumsum(counts.view(-1), 0) - counts.view(-1))[g]
    indices = torch.zeros(s_pad, 2, _bucket(int(counts.max()), MIN_PAGES), dtype=torch.int32)
    indices[g // 2, g % 2, pos] = page[order].to(torch.int32)
    return counts, indices


def _member_bits(runs: _Runs, seq: torch.Tensor,
                 page: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The member words to set for masked pages (sequence seq [M], page [M]): each of the
    page's slots is looked up in its sequence's runs (sorted by start; runs of one context are
    disjoint). Returns (word << 40) + slot [K] and the OR of the sequences' bits there [K]."""
    slot = (page[:, None] * KV_BLOCK + torch.arange(KV_BLOCK)).view(-1)  # [M*KV_BLOCK]
    seq = seq.repeat_interleave(KV_BLOCK)
    stride = 1 << 40
    run_key, order = torch.sort(runs.seq * stride + runs.start)
    r = (torch.searchsorted(run_key, seq * stride + slot, right=True) - 1).clamp(min=0)
    inside = ((run_key[r] <= seq * stride + slot) & (runs.seq[order][r] == seq)
              & (slot < runs.end[order][r]))
    slot, seq = slot[inside], seq[inside]
    key, inv = torch.unique((seq // 64) * stride + slot, return_inverse=True)
    bits = torch.zeros(len(key), dtype=torch.long).index_add_(
        0, inv, torch.ones_like(seq) << (seq % 64))  # distinct bits: their sum is their OR
    return key, bits


@lru_cache(maxsize=None)
def _compiled_flex() -> Any:
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, RECOMPILE_LIMIT)
    return torch.compile(flex_attention, dynamic=False)


def flex_paged_attend(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                      meta: PagedAttention) -> torch.Tensor:
    """q: [1, N, Hq, D] (flat tokens); k_pool, v_pool: [Hkv, num_slots, D] -> [1, N, Hq, D]."""
    st: FlexPagedState = meta.state
    _, _, hq, d = q.shape
    hkv = k_pool.shape[0]
    g = hq // hkv
    s, t = st.num_seqs, st.num_q
    qp = q[0][st.q_index]  # [S_pad, Q, Hq, D]
    qp = qp.view(s, t, hkv, g, d).permute(0, 2, 1, 3, 4).reshape(s, hkv, t * g, d)
    block_mask = st.block_mask(g, k_pool.shape[1])
    out = _compiled_flex()(qp, k_pool[None], v_pool[None], block_mask=block_mask,
                           kernel_options=KERNEL_OPTIONS)  # [S_pad, Hkv, Q*G, D]
    out = out.view(s, hkv, t, g, d).permute(0, 2, 1, 3, 4).reshape(s * t, hq, d)
    return out[st.out_index][None]
