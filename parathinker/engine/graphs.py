"""The graph path of the runner: decode-only steps through one compiled forward, replayed as
CUDA graphs on CUDA.

    graphs = DecodeGraphs(model, kv_cache, scratch_slot)     # ModelRunner(compile=True)
    if graphs.takes(work): logits = graphs.run(work)          # [len(work), V], float32

A step is taken when every sequence forwards exactly one token (paths and summaries alike), there
are at most BATCH_BUCKETS[-1] of them and their padded contexts fit MAX_PADDED_SLOTS; prefill,
chunked and mixed steps and larger ones stay eager in the runner. The step's inputs are device
tensors padded to a batch bucket B (a power of two) and a context width W (four per power of
two, `attention.static_decode.width_bucket`): token ids, positions, segment ids [B], the slot
mapping [B], the context slots [B, W] and lengths [B]; padding rows write to the scratch slot
and their logits are dropped. The forward (model, final norm, logits of every row) is compiled with
torch.compile(fullgraph=True, dynamic=False), B (past 1) and W marked dynamic: two graphs in all
(batch 1, any other bucket) whatever the widths, each compiled once (a cold compile costs 10-30 s
on CPU), and fullgraph=True refuses any graph break. On CUDA each (B, W) is also captured once
as a torch.cuda.CUDAGraph (static input buffers, one memory pool shared by every capture) and
replayed; the buckets bound the captures. The sampler stays outside (it is not tensor-only).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from parathinker.attention.pool import PagedKVCache
from parathinker.attention.static_decode import StaticDecode, width_bucket
from parathinker.engine.request import SeqWork
from parathinker.model.decoder import ParaThinkerForCausalLM
from parathinker.model.fast_linear import PackedLinear

log = logging.getLogger(__name__)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# a step whose padded context (batch bucket x width) is larger runs eager: the graph path gathers
# it per layer (attention.static_decode), which costs memory and bandwidth the eager path does not
MAX_PADDED_SLOTS = 1 << 20
# dynamo's recompile limit (default 8) counts over every runner in the process (one code object)
RECOMPILE_LIMIT = 64


def resolve_compile(compile: bool | None, device: torch.device) -> bool:
    """LLM(compile=None): on for CUDA (compiled and CUDA graphs), off on CPU unless asked."""
    if compile is None:
        return device.type == "cuda"
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be True, False or None (per device), got {compile!r}")
    return compile


def batch_bucket(n: int) -> int | None:
    """The smallest batch bucket holding n rows, or None past the largest (eager then)."""
    return next((b for b in BATCH_BUCKETS if b >= n), None)


def mark_dynamic(inputs: list[torch.Tensor]) -> None:
    """The batch (past 1, which dynamo specialises) and the width are symbolic in the compiled
    forward: one graph for batch 1, one for every other bucket, whatever the width."""
    if inputs[0].shape[0] > 1:
        for x in inputs:
            torch._dynamo.mark_dynamic(x, 0)
    torch._dynamo.mark_dynamic(inputs[4], 1)


@dataclass
class _Captured:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]  # static buffers the graph reads
    logits: torch.Tensor  # [B, V], overwritten by each replay


class DecodeGraphs:
    def __init__(self, model: ParaThinkerForCausalLM, kv_cache: PagedKVCache, scratch: int) -> None:
        swapped = [n for n, m in model.named_modules()
                   if isinstance(m, PackedLinear) or type(m).__module__.startswith("torch.ao.")]
        if swapped:
            raise ValueError(f"the graph path compiles plain linear layers; {swapped[0]} was "
                             "swapped (model.fast_linear: packed or int8): use linear='plain'")
        self.model, self.kv_cache, self.scratch = model, kv_cache, scratch
        self.device = kv_cache.k.device
        kv_cache.k[:, :, scratch].zero_()  # padding reads it, masked: it must be finite
        kv_cache.v[:, :, scratch].zero_()
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                                   RECOMPILE_LIMIT)
        self.cuda_graphs = self.device.type == "cuda"
        self.forward = torch.compile(self._forward, fullgraph=True, dynamic=False)
        self.captured: dict[tuple[int, int], _Captured] = {}
        self._pool: Any = None
        self.num_steps = 0  # decode steps taken by the graph path
        self.failed = False  # the compiled forward raised once: eager from then on (`run`)
        self.num_replays = 0  # of them, replayed as CUDA graphs

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, segments: torch.Tensor,
                 slot_mapping: torch.Tensor, slots: torch.Tensor,
                 lengths: torch.Tensor) -> torch.Tensor:
        meta = StaticDecode(slot_mapping, slots, lengths)
        hidden = self.model(ids[None], positions[None], segments[None], meta, self.kv_cache)
        return self.model.compute_logits(hidden[0])

    @staticmethod
    def takes(work: Sequence[SeqWork]) -> bool:
        """A decode-only step of at most BATCH_BUCKETS[-1] sequences whose padded contexts
        (B x W slots, gathered per layer) stay under MAX_PADDED_SLOTS."""
        b = batch_bucket(len(work))
        if b is None or not work or any(len(w.token_ids) != 1 for w in work):
            return False
        longest = max(sum(n for _, n in w.context) for w in work)
        return b * width_bucket(longest) <= MAX_PADDED_SLOTS

    def inputs(self, work: Sequence[SeqWork]) -> list[torch.Tensor]:
        """The step's padded device tensors, in the forward's argument order."""
        b = batch_bucket(len(work))
        assert b is not None
        meta = StaticDecode.build([w.context for w in work], b, self.scratch, self.device)
        host = torch.zeros(3, b, dtype=torch.long)
        host[:, : len(work)] = torch.tensor([[w.token_ids[0] for w in work],
                                             [w.positions[0] for w in work],
                                             [w.segment for w in work]])
        ids, positions, segments = host.to(self.device).unbind(0)
        inputs = [ids, positions, segments, meta.slot_mapping, meta.slots, meta.lengths]
        mark_dynamic(inputs)
        return inputs

    def run(self, work: Sequence[SeqWork]) -> torch.Tensor | None:
        """-> float32 logits [len(work), V] of each sequence's one token, in order; None when
        the compiled forward failed (a compiler or capture error on this machine): the graph
        path is then off for good (`failed`), logged once, and the caller decodes eagerly. A
        step that failed may have written its K/V already; the eager step writes the same."""
        inputs = self.inputs(work)
        try:
            logits = self._replay(inputs) if self.cuda_graphs else self.forward(*inputs)
        except Exception:  # noqa: BLE001 - any failure of the compiled path leaves eager
            log.exception("the compiled decode step failed; decoding eagerly from now on")
            self.failed = True
            return None
        self.num_steps += 1
        return logits[: len(work)]

    def _replay(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        key = (inputs[0].shape[0], inputs[4].shape[1])
        captured = self.captured.get(key)
        if captured is None:
            try:
                captured = self.captured[key] = self._capture(inputs)
            except Exception:  # noqa: BLE001 - a capture that fails leaves the compiled path
                log.exception("CUDA graph capture failed for batch %d, width %d; decoding "
                              "without CUDA graphs", *key)
                self.cuda_graphs = False
                return self.forward(*inputs)
        for buf, x in zip(captured.inputs, inputs):
            buf.copy_(x)
        captured.graph.replay()
        self.num_replays += 1
        return captured.logits.clone()

    def _capture(self, inputs: list[torch.Tensor]) -> _Captured:
        """Warm up (compile, autotune) on a side stream, then capture one step. The warm-up
        writes this step's K/V to this step's slots: the replay writes the same values."""
        static = [x.clone() for x in inputs]
        mark_dynamic(static)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.forward(*static)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.forward(*static)
        return _Captured(graph, static, logits)
