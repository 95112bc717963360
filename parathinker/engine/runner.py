"""Turns one scheduled step into flat tensors, runs the model, returns the logits that are needed.

The KV pool is one preallocated tensor pair per device, [num_layers, num_blocks * block_size,
Hkv, D]; a slot is block * block_size + offset. Each sequence's context is its list of slots
(the prompt's, the paths', its own), so partially filled blocks need no padding: the summary
attends to exactly the tokens of SPEC §4.
"""

from __future__ import annotations

import torch

from parathinker.attention.reference import CacheAttention, KVCache
from parathinker.engine.request import SeqWork
from parathinker.model.decoder import ParaThinkerForCausalLM


def kv_bytes_per_block(model: ParaThinkerForCausalLM, block_size: int, dtype: torch.dtype) -> int:
    cfg = model.config
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


class ModelRunner:
    def __init__(self, model: ParaThinkerForCausalLM, num_blocks: int, block_size: int) -> None:
        cfg = model.config
        p = next(model.parameters())
        self.model, self.device = model, p.device
        self.kv_cache = KVCache.allocate(cfg.num_hidden_layers, num_blocks * block_size,
                                         cfg.num_key_value_heads, cfg.head_dim, p.dtype, p.device)

    @torch.inference_mode()
    def run(self, work: list[SeqWork]) -> torch.Tensor:
        """-> float32 logits [R, V] of the last token of each sequence with needs_logits, in order."""
        ids = [t for w in work for t in w.token_ids]
        positions = [p for w in work for p in w.positions]
        segments = [w.segment for w in work for _ in w.token_ids]
        meta = CacheAttention.build([len(w.token_ids) for w in work],
                                    [w.context_slots for w in work], self.device)
        flat = lambda x: torch.tensor([x], dtype=torch.long, device=self.device)  # noqa: E731
        hidden = self.model(flat(ids), flat(positions), flat(segments), meta, self.kv_cache)[0]
        ends, end = [], 0
        for w in work:
            end += len(w.token_ids)
            if w.needs_logits:
                ends.append(end - 1)
        if not ends:
            return torch.empty(0, self.model.vocab_size, device=self.device)
        return self.model.compute_logits(hidden[torch.tensor(ends, device=self.device)])
