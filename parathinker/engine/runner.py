"""The model runner: one flat forward over every scheduled sequence's new tokens.

Each sequence attends to its context, given as runs of consecutive slots of the paged pool (the
prompt's, (the paths'), its own), read in place by the attention backend: partially filled
blocks need no padding, and the summary attends to exactly the tokens of SPEC §4. The metadata
of a step is O(runs): nothing here walks the slots of a context. With compile on, a decode-only
step goes through the graph path instead (`engine.graphs`: compiled, CUDA graphs on CUDA), which
writes its padding rows to one scratch slot past the blocks.
"""

from __future__ import annotations

import torch

from parathinker.attention.paged import backend_for
from parathinker.attention.pool import PagedAttention, PagedKVCache
from parathinker.engine.graphs import DecodeGraphs, resolve_compile
from parathinker.engine.request import SeqWork
from parathinker.model.decoder import ParaThinkerForCausalLM


def kv_bytes_per_block(model: ParaThinkerForCausalLM, block_size: int, dtype: torch.dtype) -> int:
    cfg = model.config
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


class ModelRunner:
    def __init__(self, model: ParaThinkerForCausalLM, num_blocks: int, block_size: int,
                 attention: str = "auto", compile: bool | None = None) -> None:
        cfg = model.config
        p = next(model.parameters())
        self.model, self.device = model, p.device
        self.backend = backend_for(attention, self.device)  # the one choice of backend
        self.attention = self.backend.name  # as resolved ("auto" -> runs or flex)
        self.compiled = resolve_compile(compile, self.device)  # None: on for CUDA only
        scratch = num_blocks * block_size  # the graph path's padding slot (one extra block)
        self.kv_cache = PagedKVCache.allocate(cfg.num_hidden_layers,
                                              scratch + (block_size if self.compiled else 0),
                                              cfg.num_key_value_heads, cfg.head_dim, p.dtype,
                                              p.device, zeroed=self.backend.zeroed_pool)
        self.graphs = DecodeGraphs(model, self.kv_cache, scratch) if self.compiled else None

    def build(self, work: list[SeqWork]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                  PagedAttention]:
        """-> token ids, positions, segment ids ([1, N] each) and the attention metadata."""
        ids = [t for w in work for t in w.token_ids]
        positions = [p for w in work for p in w.positions]
        segments = [w.segment for w in work for _ in w.token_ids]
        meta = self.backend.build_metadata([len(w.token_ids) for w in work],
                                           [w.context for w in work], self.device)
        inputs = torch.tensor([ids, positions, segments], dtype=torch.long)  # one copy to the device
        inputs = inputs.to(self.device)
        return inputs[0:1], inputs[1:2], inputs[2:3], meta

    @torch.inference_mode()
    def copy_blocks(self, copies: list[tuple[int, int]], block_size: int) -> None:
        """Copy the K/V of every layer from block a to block b, for each (a, b) in order (the
        block manager's moves): one copy per stretch of consecutive blocks on both sides whose
        source and destination do not overlap (a later move may write where an earlier one
        read; in order, each copy reads before any later one writes)."""
        i = 0
        while i < len(copies):
            a, b = copies[i]
            n = 1
            while i + n < len(copies) and copies[i + n] == (a + n, b + n) and abs(a - b) > n:
                n += 1
            src, dst = slice(a * block_size, (a + n) * block_size), slice(b * block_size, (b + n) * block_size)
            for pool in (self.kv_cache.k, self.kv_cache.v):
                pool[:, :, dst].copy_(pool[:, :, src])
            i += n

    @torch.inference_mode()
    def run(self, work: list[SeqWork]) -> torch.Tensor:
        """-> float32 logits [R + F, V]: of the last token of each sequence with needs_logits, in
        order, then of each `forced` position, in order."""
        ends, forced, end = [], [], 0
        for w in work:
            forced += [end + i for i in w.forced]
            end += len(w.token_ids)
            if w.needs_logits:
                ends.append(end - 1)
        rows = ends + forced
        graphed = self.graphs is not None and not self.graphs.failed and self.graphs.takes(work)
        logits = self.graphs.run(work) if graphed else None  # flat token i = sequence i
        if logits is not None:
            if rows == list(range(len(work))):
                return logits
            return logits[torch.tensor(rows, dtype=torch.long, device=self.device)]
        ids, positions, segments, meta = self.build(work)
        hidden = self.model(ids, positions, segments, meta, self.kv_cache)[0]
        if not rows:
            return torch.empty(0, self.model.vocab_size, device=self.device)
        if rows == list(range(hidden.shape[0])):  # every row, in order (decoding): no gather
            return self.model.compute_logits(hidden)
        return self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])


@torch.inference_mode()
def profile_activation_bytes(model: ParaThinkerForCausalLM, num_tokens: int) -> int:
    """Peak CUDA memory of one forward of `num_tokens` new tokens beyond what is allocated now
    (the KV pool is sized from it, not from a fixed fraction of free memory)."""
    cfg = model.config
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    cache = PagedKVCache.allocate(cfg.num_hidden_layers, num_tokens, cfg.num_key_value_heads,
                                  cfg.head_dim, dtype, device)
    cache_bytes = 2 * cache.k.numel() * cache.k.element_size()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    meta = backend_for("auto", device).build_metadata([num_tokens], [[(0, num_tokens)]], device)
    ids = torch.zeros(1, num_tokens, dtype=torch.long, device=device)
    hidden = model(ids, torch.arange(num_tokens, device=device)[None], ids, meta, cache)
    model.compute_logits(hidden[0, -1:])
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del cache, hidden
    torch.cuda.empty_cache()
    return max(0, peak - cache_bytes)
