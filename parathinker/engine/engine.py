"""The engine: owns the block manager, the scheduler, the runner and sampling.

    engine = Engine(model, ctrl, template_ids, block_size=16, num_kv_blocks=4096)
    engine.add_request("r1", prompt_ids, params)
    while engine.has_unfinished():
        for req in engine.step(): ...     # requests that finished, failed or were aborted

Data flows one way: scheduler (ints) -> SeqWork lists -> runner (tensors) -> logits -> sampler
-> the requests' state update. Sampling uses one generator per request, in the same order as the
reference generator, so a seed gives the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import itertools
import time

import torch

from parathinker.config import PlainParams, SamplingParams
from parathinker.engine.block_manager import BlockManager
from parathinker.engine.request import ABORTED, FINISHED, PlainRequest, Request
from parathinker.engine.runner import ModelRunner, kv_bytes_per_block
from parathinker.engine.scheduler import Scheduler
from parathinker.model.decoder import ParaThinkerForCausalLM
from parathinker.sampler import LogitMasks, make_generator, sample
from parathinker.tokens import ControlTokens

DEFAULT_CPU_KV_BYTES = 4 << 30
# "native": SPEC §4-5 (train-consistent, the default); "reference": SPEC §6, the released vLLM
# fork's own layout (pads, lock-step first-finish, 2·Lp + L summary positions), for reproducing
# the model card.
LAYOUTS = ("native", "reference")


def default_num_blocks(model: ParaThinkerForCausalLM, block_size: int,
                       kv_cache_memory: int | None) -> int:
    """Blocks from a memory budget; by default 90% of free GPU memory, or up to 4 GiB on CPU
    (allocated lazily: untouched pages cost nothing)."""
    p = next(model.parameters())
    per_block = kv_bytes_per_block(model, block_size, p.dtype)
    if kv_cache_memory is None:
        if p.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(p.device)
            kv_cache_memory = int(free * 0.9)
        else:
            kv_cache_memory = DEFAULT_CPU_KV_BYTES
    return max(1, kv_cache_memory // per_block)


class Engine:
    def __init__(self, model: ParaThinkerForCausalLM, ctrl: ControlTokens, template_ids: list[int],
                 block_size: int = 16, num_kv_blocks: int | None = None,
                 kv_cache_memory: int | None = None, max_num_batched_tokens: int = 8192,
                 layout: str = "native") -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; use one of {LAYOUTS}")
        if layout == "reference":
            raise NotImplementedError("the reference layout (SPEC §6) is not implemented yet")
        self.layout = layout
        if num_kv_blocks is None:
            num_kv_blocks = default_num_blocks(model, block_size, kv_cache_memory)
        self.ctrl, self.template_ids = ctrl, list(template_ids)
        self.block_manager = BlockManager(num_kv_blocks, block_size)
        self.scheduler = Scheduler(self.block_manager, max_num_batched_tokens)
        self.runner = ModelRunner(model, num_kv_blocks, block_size)
        self.masks = LogitMasks(ctrl, self.runner.device)
        self.generators: dict[str, torch.Generator] = {}
        self.requests: dict[str, Request] = {}
        self._arrivals = itertools.count()
        self._aborted: list[Request] = []
        self.num_steps = 0

    def add_request(self, request_id: str, prompt_ids: list[int],
                    params: SamplingParams | PlainParams) -> Request:
        """A ParaThinker request (SamplingParams) or one plain trace (PlainParams)."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        if isinstance(params, PlainParams):
            req: Request = PlainRequest(request_id, next(self._arrivals), prompt_ids, params, self.ctrl)
        else:
            req = Request(request_id, next(self._arrivals), prompt_ids, params, self.ctrl,
                          self.template_ids)
        self.requests[request_id] = req
        self.generators[request_id] = make_generator(params.seed)
        self.scheduler.add(req)
        return req

    def abort(self, request_id: str) -> Request | None:
        """Stop a request now and free its blocks; it is returned by the next step()."""
        req = self.scheduler.abort(request_id)
        if req is not None:
            self._aborted.append(req)
        return req

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted)

    def step(self) -> list[Request]:
        """Run one forward over every scheduled request; return the requests that ended."""
        ended = self._aborted
        self._aborted = []
        scheduled, failed = self.scheduler.schedule()
        ended += failed
        if scheduled:
            work = [req.work() for req in scheduled]
            logits = self.runner.run([w for ws in work for w in ws])
            row = 0
            for req, ws in zip(scheduled, work):
                num_rows = sum(w.needs_logits for w in ws)
                req.mark_computed()
                self._advance(req, logits[row: row + num_rows])
                row += num_rows
                if req.status == FINISHED:
                    self.scheduler.finish(req)
                    ended.append(req)
            self.num_steps += 1
        for req in ended:
            req.finish_time = time.perf_counter()
            self.requests.pop(req.request_id, None)
            self.generators.pop(req.request_id, None)
        return ended

    def _advance(self, req: Request, logits: torch.Tensor) -> None:
        p, gen = req.params, self.generators[req.request_id]
        if isinstance(req, PlainRequest):
            (token,) = sample(logits.clone(), p.temperature, p.top_p, p.top_k, gen)
            req.apply_token(token)
        elif req.summary is None:
            ks = req.paths_to_sample()
            chosen: list[int] = []
            if ks:
                rows = self.masks.paths(logits.clone(), req.path_can_end(ks))
                chosen = sample(rows, p.temperature, p.top_p, p.top_k, gen)
            req.apply_paths(ks, chosen)
        else:
            (token,) = sample(self.masks.summary(logits.clone()), p.temperature, p.top_p, p.top_k, gen)
            req.apply_summary(token)

    def run_to_completion(self) -> list[Request]:
        ended = []
        while self.has_unfinished():
            ended += self.step()
        return ended


__all__ = ["ABORTED", "Engine"]
