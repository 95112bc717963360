"""One background thread owns the Engine; HTTP handlers talk to it through a command queue.

    loop = EngineLoop(llm.engine, metrics, tokenizer, template_len); loop.start()
    loop.add("r1", prompt_ids, params, publish, stream=True,   # publish(Delta), engine thread
             job=Job(n=2, logprobs=5, stop=("\n\n",)))
    loop.abort("r1")                                           # frees its KV blocks at once
    loop.fail_all("why")        # end everything in flight (shutdown drain timed out)
    loop.stop()

Commands (`_Add`, `_Abort`, `_FailAll`, `_Stop`) are applied between steps, so every request in
flight shares each forward (continuous batching across clients). After each step the thread
publishes, per request, what is new since the last step as a `Delta` (token ids only:
detokenizing is the handler's job), built by the engine's `output_processor.SampleStream`, with
the confidence of each path that closed in that step (`Delta.path_confidence`); the
last Delta of each of a request's n samples carries that ended sample. A sample whose summary's
generated text holds one of the job's stop strings (`SampleStream.is_stop_hit`) is ended
right after the step that completed it (`Engine.stop_sample`). With nothing to run it blocks on the
queue: no busy wait. A request the engine fails alone (step() returns it with `error` set)
fails alone here too; an exception out of a step fails the requests in flight, frees their
blocks and keeps the loop alive.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from parathinker.config import SamplingParams
from parathinker.engine import Engine
from parathinker.engine.group import members
from parathinker.engine.output_processor import Delta as SampleDelta
from parathinker.engine.output_processor import SampleStream
from parathinker.engine.request import FINISHED
from parathinker.serve.metrics import Metrics

log = logging.getLogger("parathinker.serve")


@dataclass
class Delta(SampleDelta):
    """A sample's engine Delta and, for each path that closed in its step, the path's final
    confidence (None unless the request set confidence_window): the stream's per-path finish."""

    path_confidence: dict[int, float | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Job:
    """What a request asks for beyond its prompt and SamplingParams."""

    n: int = 1  # samples sharing the prompt (Engine.add_request)
    logprobs: int | None = None  # top alternatives per sampled summary token
    path_logprobs: bool = False
    stop: tuple[str, ...] = ()  # stop strings, on each summary's generated text


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    publish: Callable[[Delta], None]
    stream: bool
    job: Job


@dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclass(frozen=True)
class _FailAll:
    why: str


@dataclass(frozen=True)
class _Stop:
    pass


_Command = _Add | _Abort | _FailAll | _Stop


@dataclass
class _Tracked:
    req: Any  # Request or SampleGroup
    publish: Callable[[Delta], None]
    stream: bool  # publish every step, or only the final Deltas
    samples: list[SampleStream]
    is_started: bool = False


class EngineLoop:
    def __init__(self, engine: Engine, metrics: Metrics | None = None, tokenizer: Any = None,
                 template_len: int = 0) -> None:
        """tokenizer, template_len: for stop strings (the summary template's length in tokens)."""
        self.engine, self.tokenizer, self.template_len = engine, tokenizer, template_len
        self.metrics = metrics or Metrics(engine.num_kv_blocks)
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._tracked: dict[str, _Tracked] = {}
        self._thread = threading.Thread(target=self._run, name="parathinker-engine", daemon=True)

    # ----- called from any thread
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Abort everything in flight and end the thread."""
        if self._thread.is_alive():
            self._commands.put(_Stop())
            self._thread.join(timeout)

    def fail_all(self, why: str) -> None:
        """End every request in flight now (blocks freed); handlers get `is_shutdown` Deltas."""
        self._commands.put(_FailAll(why))

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
            publish: Callable[[Delta], None], stream: bool = True, job: Job = Job()) -> None:
        """Queue a validated request; `publish` is called on the engine thread with each Delta."""
        if job.stop and self.tokenizer is None:
            raise ValueError("stop strings need the EngineLoop's tokenizer")
        self._commands.put(_Add(request_id, prompt_ids, params, publish, stream, job))

    def abort(self, request_id: str) -> None:
        """Stop the request and free its blocks (a no-op if it already ended)."""
        self._commands.put(_Abort(request_id))

    # ----- the engine thread
    def _run(self) -> None:
        while True:
            try:
                idle = not self.engine.has_unfinished()
                commands = [self._commands.get()] if idle else []  # sleep until there is work
                while True:
                    try:
                        commands.append(self._commands.get_nowait())
                    except queue.Empty:
                        break
                for cmd in commands:
                    if isinstance(cmd, _Stop):
                        self._fail_all("the server is shutting down", is_shutdown=True)
                        return
                    if isinstance(cmd, _FailAll):
                        self._fail_all(cmd.why, is_shutdown=True)
                    elif isinstance(cmd, _Abort):
                        self.engine.abort(cmd.request_id)
                    else:
                        self._add(cmd)
                if self.engine.has_unfinished():
                    self._step()
                self._snapshot()
            except Exception as e:  # never let the thread die with requests waiting on it
                log.exception("engine loop error")
                self._fail_all(f"internal server error: {e!r}", is_internal=True)

    def _add(self, cmd: _Add) -> None:
        job = cmd.job
        try:
            req = self.engine.add_request(cmd.request_id, cmd.prompt_ids, cmd.params, n=job.n,
                                          logprobs=job.logprobs, path_logprobs=job.path_logprobs)
        except Exception as e:
            self.metrics.inc("parathinker_requests_total", status="failed")
            _safe(cmd.publish, Delta(error=f"could not add the request: {e}", is_internal=True))
            return
        samples = [SampleStream(cmd.params.num_paths, job.stop, self.tokenizer, self.template_len)
                   for _ in range(job.n)]
        self._tracked[cmd.request_id] = _Tracked(req, cmd.publish, cmd.stream, samples)

    def _step(self) -> None:
        try:
            ended = self.engine.step()
        except Exception as e:
            log.exception("engine step failed")
            self._fail_all(f"internal server error in an engine step: {e!r}", is_internal=True)
            return
        self.metrics.inc("parathinker_engine_steps_total")
        ended_ids = {r.request_id for r in ended}
        for rid, t in list(self._tracked.items()):
            if rid not in ended_ids:
                self._check_stops(rid, t)
            self._publish(t, is_final=rid in ended_ids)

    def _check_stops(self, rid: str, t: _Tracked) -> None:
        for i, (m, sent) in enumerate(zip(members(t.req), t.samples)):
            if sent.is_stop_hit(m):
                self.engine.stop_sample(rid, i)

    def _publish(self, t: _Tracked, is_final: bool, error: str | None = None,
                 is_internal: bool = False, is_shutdown: bool = False) -> None:
        req, m = t.req, self.metrics
        samples = members(req)
        if not t.is_started and req.num_forward_tokens > 0:  # prefilled: its paths have started
            t.is_started = True
            m.inc("parathinker_paths_started_total", sum(len(s.paths) for s in samples))
            m.inc("parathinker_tokens_total", len(req.prompt.tokens), kind="prompt")
        if is_final:
            m.inc("parathinker_requests_total", status=req.status if error is None else "failed")
            error = error or (None if req.status == FINISHED else req.error or req.status)
            if req.status == FINISHED and req.finish_time is not None:
                m.inc("parathinker_request_latency_seconds_sum", req.finish_time - req.arrival_time)
                m.inc("parathinker_request_latency_seconds_count")
            del self._tracked[req.request_id]
        for i, (sample, sent) in enumerate(zip(samples, t.samples)):
            d = Delta(**vars(sent.delta(i, sample)))
            confidence = sample.path_confidence
            d.path_confidence = {k: None if confidence is None else confidence[k] for k in d.path_finish}
            self._count(d)
            if is_final:
                d.request, d.status, d.error = sample, req.status, error
                d.is_internal, d.is_shutdown = is_internal, is_shutdown
            if is_final or (t.stream and not d.is_empty()):
                _safe(t.publish, d)

    def _count(self, d: Delta) -> None:
        m = self.metrics
        for ids in d.path_tokens.values():
            m.inc("parathinker_tokens_total", len(ids), kind="path")
        for reason in d.path_finish.values():
            m.inc("parathinker_paths_finished_total", reason=reason)
            if reason == "cut":
                m.inc("parathinker_paths_cut_total")
        if d.summary_tokens:
            m.inc("parathinker_tokens_total", len(d.summary_tokens), kind="summary")

    def _fail_all(self, why: str, is_internal: bool = False, is_shutdown: bool = False) -> None:
        """Abort every tracked request (freeing its blocks) and tell its handler why."""
        for rid in list(self._tracked):
            try:
                self.engine.abort(rid)
            except Exception:
                log.exception("abort of %s failed", rid)
        try:
            self.engine.step()  # returns the aborted requests; nothing is left to run
        except Exception:
            log.exception("engine step after aborting everything failed")
        for t in list(self._tracked.values()):
            self._publish(t, is_final=True, error=why, is_internal=is_internal,
                          is_shutdown=is_shutdown)
        self._snapshot()

    def _snapshot(self) -> None:
        load, m = self.engine.load(), self.metrics
        m.set("parathinker_kv_cache_blocks_used", load.num_kv_blocks_used)
        m.set("parathinker_kv_cache_blocks_total", load.num_kv_blocks)
        m.set("parathinker_requests_running", load.num_running)
        m.set("parathinker_requests_waiting", load.num_waiting)


def _safe(publish: Callable[[Delta], None], delta: Delta) -> None:
    try:
        publish(delta)
    except Exception:  # e.g. the event loop is already closed at shutdown
        log.debug("could not publish a delta", exc_info=True)
