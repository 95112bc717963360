"""The engine: owns the block manager, the scheduler, the runner and sampling.

    engine = Engine(model, ctrl, template_ids, block_size=16, num_kv_blocks=4096)
    engine.add_request("r1", prompt_ids, params)
    while engine.has_unfinished():
        for req in engine.step(): ...     # requests that finished, failed or were aborted

Data flows one way: scheduler (ints) -> SeqWork lists -> runner (tensors) -> logits -> masks ->
one batched sampling call -> the requests' state update. Sampling noise is counter-based (the
request's seed and the index of the token drawn), so a seed gives the same tokens alone, in any
batch and after preemption. A step that raises is re-run request by request, so a request that
breaks a step fails alone and the others go on.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from parathinker.config import PlainParams, SamplingParams
from parathinker.engine.block_manager import BlockManager
from parathinker.engine.confidence import token_confidence
from parathinker.engine.group import SampleGroup, members
from parathinker.engine.reference_request import ReferenceRequest
from parathinker.engine.request import (ABORTED, FAILED, FINISHED, LogprobEntry, PlainRequest,
                                        Request, SampleRow, Seq, SeqGroup, SeqWork)
from parathinker.engine.runner import ModelRunner, kv_bytes_per_block, profile_activation_bytes
from parathinker.engine.scheduler import Scheduler
from parathinker.model.decoder import ParaThinkerForCausalLM
from parathinker.engine import sampler
from parathinker.engine.sampler import LogitMasks
from parathinker.spec.tokens import ControlTokens

log = logging.getLogger(__name__)
DEFAULT_CPU_KV_BYTES = 4 << 30
GPU_MEMORY_UTILIZATION = 0.9
# "native": SPEC §4-5 (train-consistent, the default); "reference": SPEC §6, the released vLLM
# fork's own layout (pads, lock-step first-finish, 2·Lp + L summary positions), for reproducing
# the model card.
LAYOUTS = ("native", "reference")


def default_num_blocks(model: ParaThinkerForCausalLM, block_size: int,
                       kv_cache_memory: int | None, max_num_batched_tokens: int) -> int:
    """Blocks from a memory budget. On CUDA by default: 90% of the GPU's memory, less the
    weights and the peak activations of a forward of `max_num_batched_tokens` (measured); on
    CPU, 4 GiB (not zeroed, except for the flex backend: pages are only backed once written)."""
    p = next(model.parameters())
    per_block = kv_bytes_per_block(model, block_size, p.dtype)
    if kv_cache_memory is None:
        if p.device.type == "cuda":
            activations = profile_activation_bytes(model, max_num_batched_tokens)
            total = torch.cuda.get_device_properties(p.device).total_memory
            kv_cache_memory = int(total * GPU_MEMORY_UTILIZATION
                                  - torch.cuda.memory_allocated(p.device) - activations)
            if kv_cache_memory < per_block:
                raise ValueError(f"no GPU memory left for the KV cache after the weights and "
                                 f"{activations / 2**30:.1f} GiB of activations; lower "
                                 "max_num_batched_tokens or pass kv_cache_memory")
        else:
            kv_cache_memory = DEFAULT_CPU_KV_BYTES
    return max(1, kv_cache_memory // per_block)


@dataclass(frozen=True)
class EngineLoad:
    num_kv_blocks_used: int
    num_kv_blocks: int
    num_running: int  # requests in the batch
    num_waiting: int  # requests queued (new, or preempted)


class Engine:
    def __init__(self, model: ParaThinkerForCausalLM, ctrl: ControlTokens, template_ids: list[int],
                 block_size: int = 16, num_kv_blocks: int | None = None,
                 kv_cache_memory: int | None = None, max_num_batched_tokens: int = 8192,
                 layout: str = "native", attention: str = "auto",
                 compile: bool | None = None,
                 answer_of: Callable[[list[int]], str | None] | None = None) -> None:
        """answer_of: a path's text ids -> its answer key (spec.answers.answer_key of the decoded
        text; `LLM` supplies it from its tokenizer), needed by requests with stop_on_agreement."""
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; use one of {LAYOUTS}")
        if ctrl.summary_open is not None and (not template_ids or template_ids[0] != ctrl.summary_open):
            raise ValueError("the summary template must start with <summary> (SPEC §3), got token "
                             f"ids {list(template_ids)[:8]}")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        self.layout = layout
        if num_kv_blocks is None:
            num_kv_blocks = default_num_blocks(model, block_size, kv_cache_memory,
                                               max_num_batched_tokens)
        self.ctrl, self.template_ids = ctrl, list(template_ids)
        self.answer_of = answer_of
        self.vocab_size = model.vocab_size
        self.runner = ModelRunner(model, num_kv_blocks, block_size, attention, compile)
        self.block_manager = BlockManager(num_kv_blocks, block_size, self.runner.backend.wants_one_run)
        self.scheduler = Scheduler(self.block_manager, max_num_batched_tokens)
        self.masks = LogitMasks(ctrl, self.runner.device)
        self.requests: dict[str, SeqGroup] = {}
        self._arrivals = itertools.count()
        self._aborted: list[SeqGroup] = []
        self.num_steps = 0
        self.num_sampled_tokens = 0  # every token sampled so far (progress bars)
        self._stepping = threading.Lock()  # held by the one step in flight (see step)

    def add_request(self, request_id: str, prompt_ids: list[int],
                    params: SamplingParams | PlainParams, n: int = 1,
                    logprobs: int | None = None, path_logprobs: bool = False) -> SeqGroup:
        """A ParaThinker request (SamplingParams) or one plain trace (PlainParams). Everything
        that could fail a step is checked here: a bad request never reaches the batch.

        n > 1 (ParaThinker only): n samples sharing the prompt's KV (`SampleGroup`); sample i
        has seed `params.seed + i` (each its own random seed when params.seed is None).
        logprobs=k: record, per sampled summary token, its logprob and the top k
        (`Seq.logprobs`; path tokens too with path_logprobs)."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        check_prompt(prompt_ids, self.vocab_size)
        if n < 1 or n > 1 and not isinstance(params, SamplingParams):
            raise ValueError(f"n must be >= 1 (and 1 for a plain trace), got {n}")
        if logprobs is not None and not 0 <= logprobs <= self.vocab_size:
            raise ValueError(f"logprobs must be in 0..{self.vocab_size}, got {logprobs}")
        arrival = next(self._arrivals)
        if isinstance(params, PlainParams):
            req: SeqGroup = PlainRequest(request_id, arrival, prompt_ids, params, self.ctrl)
            req.seed = sampler.resolve_seed(params.seed)
        elif isinstance(params, SamplingParams):
            if params.num_paths > self.ctrl.max_paths:
                raise ValueError(f"num_paths={params.num_paths} but the tokenizer has "
                                 f"{self.ctrl.max_paths} <think{{k}}> tokens")
            if params.stop_on_agreement and self.answer_of is None:
                raise ValueError("stop_on_agreement needs answers: build the Engine with "
                                 "answer_of (LLM does, from its tokenizer)")
            cls = ReferenceRequest if self.layout == "reference" else Request
            ids = [request_id] if n == 1 else [f"{request_id}#{i}" for i in range(n)]
            samples = []
            for i, rid in enumerate(ids):
                seed = None if params.seed is None else params.seed + i
                sample = cls(rid, arrival, prompt_ids, replace(params, seed=seed), self.ctrl,
                             self.template_ids)
                sample.num_logprobs, sample.path_logprobs = logprobs, path_logprobs
                sample.answer_of = self.answer_of
                sample.seed = sampler.resolve_seed(seed)
                samples.append(sample)
            req = samples[0] if n == 1 else SampleGroup(request_id, arrival, prompt_ids, samples)
        else:
            raise TypeError(f"params must be SamplingParams or PlainParams, got {type(params).__name__}")
        self.requests[request_id] = req
        self.scheduler.add(req)
        return req

    def stop_sample(self, request_id: str, index: int = 0, reason: str = "stop") -> None:
        """End sample `index` of a running request now, as finished with summary_finish
        `reason` (the server's stop strings); once every sample has ended the request is
        returned by the next step() with its blocks freed. A no-op for an ended sample."""
        req = self.requests.get(request_id)
        if req is None:
            return
        sample = members(req)[index]
        if sample.status == FINISHED:
            return
        sample.status, sample.summary_finish = FINISHED, reason
        if all(m.status == FINISHED for m in members(req)):
            self.scheduler.abort(request_id)  # out of the batch, blocks freed
            req.status = FINISHED
            self._aborted.append(req)
        else:
            req.release_ended(self.block_manager)  # the others go on; its blocks come back now

    def abort(self, request_id: str) -> SeqGroup | None:
        """Stop a request now and free its blocks; it is returned by the next step()."""
        req = self.scheduler.abort(request_id)
        if req is not None:
            self._aborted.append(req)
        return req

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted)

    @property
    def block_size(self) -> int:
        return self.block_manager.block_size

    @property
    def num_kv_blocks(self) -> int:
        return self.block_manager.num_blocks

    def load(self) -> EngineLoad:
        """What the engine holds now (for the server's admission and metrics)."""
        return EngineLoad(self.block_manager.num_used, self.block_manager.num_blocks,
                          len(self.scheduler.running), len(self.scheduler.waiting))

    def step(self) -> list[SeqGroup]:
        """Run one forward over every scheduled request; return the requests that ended.

        One thread drives an engine: a step while another is in flight (e.g. `LLM.generate` on
        the LLM a server's engine thread owns) raises at once instead of both mutating the
        same requests and KV blocks."""
        if not self._stepping.acquire(blocking=False):
            raise RuntimeError("Engine.step called while another step is running: an engine is "
                               "driven by one thread (a served LLM belongs to the server's "
                               "engine thread; use a second LLM for direct calls)")
        try:
            return self._step()
        finally:
            self._stepping.release()

    def _step(self) -> list[SeqGroup]:
        ended = self._aborted
        self._aborted = []
        scheduled, failed = self.scheduler.schedule()
        ended += failed
        # blocks moved (BlockManager.move) since the last step, also outside one, are copied
        # now, before any forward writes, and once: a re-run below must not copy again (an old
        # block may hold another sequence's K/V by then)
        self.runner.copy_blocks(self.block_manager.take_copies(), self.block_size)
        if scheduled:
            try:
                self._run(scheduled)
            except Exception:  # noqa: BLE001 - find the request that broke the step
                log.exception("engine step failed; re-running its %d requests one by one",
                              len(scheduled))
                for item in scheduled:
                    try:
                        self._run([item])
                    except Exception as e:  # noqa: BLE001
                        self.scheduler.fail(item[0], f"step failed: {type(e).__name__}: {e}")
            for req, _ in scheduled:
                if req.status in (FINISHED, FAILED):
                    if req.status == FINISHED:
                        self.scheduler.finish(req)
                    ended.append(req)
                else:
                    req.release_ended(self.block_manager)  # samples of a group that ended
            self.num_steps += 1
        for req in ended:
            req.finish_time = time.perf_counter()
            self.requests.pop(req.request_id, None)
            for m in members(req):
                m.finish_time = req.finish_time
        return ended

    @torch.inference_mode()
    def _run(self, scheduled: list[tuple[SeqGroup, int]]) -> None:
        """Forward, mask and sample first; only then change the requests (so a failure leaves
        them as they were, and re-running is safe: the same K/V go to the same slots). Each
        request hands over its rows once (`sample_rows`) and takes its tokens in one call."""
        work = [req.work(budget) for req, budget in scheduled]
        logits = self.runner.run([w for ws in work for w in ws])
        rows = [req.sample_rows() if any(w.needs_logits for w in ws) else []
                for (req, _), ws in zip(scheduled, work)]
        flat = [r for rs in rows for r in rs]
        logits, forced_logits = logits[:len(flat)], logits[len(flat):]
        self.masks.rows(logits, [r.mask for r in flat], [r.can_end for r in flat])
        tokens, entries = self._sample(logits, flat)
        forced = self._forced_entries(forced_logits, [w for ws in work for w in ws])
        self.num_sampled_tokens += len(tokens)
        for (req, _), ws in zip(scheduled, work):
            req.mark_computed(ws)
        a = 0
        for (req, _), rs in zip(scheduled, rows):
            if rs or req.is_computed():  # e.g. every path closed by its budget: nothing drawn
                req.take(rs, tokens[a: a + len(rs)], entries[a: a + len(rs)])
            a += len(rs)
        for seq, index, entry in forced:
            seq.logprobs[index] = entry

    def _forced_entries(self, logits: torch.Tensor, work: list[SeqWork]
                        ) -> list[tuple[Seq, int, LogprobEntry]]:
        """The logprob entries of forced summary-template tokens (`SeqWork.forced`), under the
        distribution a summary token is drawn from (the summary mask, the request's temperature
        and filters: `sampler.logprobs_rows`, as sampled tokens): (seq, token index, entry)."""
        at = [(w.seq, w.seq.num_computed + i + 1, w.forced_owner) for w in work for i in w.forced]
        if not at:
            return []
        owners = [o for _, _, o in at]
        self.masks.rows(logits, ["summary"] * len(at), [True] * len(at))
        st = sampler.SamplingTensors.from_rows(
            [o.params.temperature for o in owners], [o.params.top_p for o in owners],
            [o.params.top_k for o in owners], [o.seed for o in owners], [0] * len(at),
            device=logits.device)
        forced = torch.tensor([o.template_ids[i] for _, i, o in at], device=logits.device)
        chosen, top_ids, top_lps = sampler.logprobs_rows(
            logits, st, forced, max(o.num_logprobs for o in owners))
        return [(seq, i, (lp, ids[:o.num_logprobs], lps[:o.num_logprobs]))
                for (seq, i, o), lp, ids, lps in zip(at, chosen.tolist(), top_ids.tolist(),
                                                     top_lps.tolist())]

    def _sample(self, logits: torch.Tensor, rows: list[SampleRow]
                ) -> tuple[list[int], list[LogprobEntry | None]]:
        """-> the sampled token of every row, and its logprob entry for the rows whose request
        asked (`logprobs`; None elsewhere), computed in the same step on the device. The rows of
        gated paths get their token's confidence (`SampleRow.confidence`), read back with the
        tokens in one transfer."""
        if not rows:
            return [], []
        st = sampler.SamplingTensors.from_rows(
            [r.owner.params.temperature for r in rows], [r.owner.params.top_p for r in rows],
            [r.owner.params.top_k for r in rows], [r.owner.seed for r in rows],
            [r.counter for r in rows], device=logits.device)
        tokens = sampler.sample_rows(logits, st)
        gated = [i for i, r in enumerate(rows) if r.kind == "path"
                 and r.owner.params.confidence_window]
        if gated:
            where = torch.tensor(gated, device=logits.device)
            conf = token_confidence(logits[where], st.select(where),
                                    [rows[i].owner.params.confidence_top_k for i in gated])
            both = torch.cat([tokens.to(torch.float64), conf]).tolist()
            tokens_list = [int(t) for t in both[:len(rows)]]  # exact: ids < 2^53
            for i, c in zip(gated, both[len(rows):]):
                rows[i].confidence = c
        else:
            tokens_list = tokens.tolist()
        asked = [i for i, r in enumerate(rows) if r.wants_logprobs]
        entries: list[LogprobEntry | None] = [None] * len(rows)
        if asked:
            where = torch.tensor(asked, device=logits.device)
            chosen, top_ids, top_lps = sampler.logprobs_rows(
                logits[where], st.select(where), tokens[where],
                max(rows[i].owner.num_logprobs for i in asked))
            for i, lp, ids, lps in zip(asked, chosen.tolist(), top_ids.tolist(), top_lps.tolist()):
                k = rows[i].owner.num_logprobs
                entries[i] = (lp, ids[:k], lps[:k])
        return tokens_list, entries

    def run_to_completion(self) -> list[SeqGroup]:
        ended = []
        while self.has_unfinished():
            ended += self.step()
        return ended



def check_prompt(prompt_ids: list[int], vocab_size: int, name: str = "prompt") -> None:
    """The one check of a prompt's token ids (LLM and Engine): not empty, every id in the vocab."""
    if not prompt_ids:
        raise ValueError(f"empty {name}")
    bad = [t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{name} has token ids outside 0..{vocab_size - 1}: {bad[:5]}")

__all__ = ["ABORTED", "Engine", "check_prompt"]
