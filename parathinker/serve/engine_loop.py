"""One background thread owns the Engine; HTTP handlers talk to it through a command queue.

    loop = EngineLoop(llm.engine, metrics); loop.start()
    loop.add("r1", prompt_ids, params, publish, stream=True)   # publish(Delta), engine thread
    loop.abort("r1")                                           # frees its KV blocks at once
    loop.fail_all("why")        # end everything in flight (shutdown drain timed out)
    loop.stop()

Commands (add, abort, stop) are applied between steps, so every request in flight shares each
forward (continuous batching across clients). After each step the thread publishes, per request,
what is new since the last step as a `Delta` (token ids only: detokenizing is the handler's job);
the last Delta of a request carries the ended Request. With nothing to run it blocks on the
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
from parathinker.engine.request import FINISHED, Request
from parathinker.serve.metrics import Metrics

log = logging.getLogger("parathinker.serve")


@dataclass
class Delta:
    """What one request gained in one step (0-based path indices, raw token ids)."""

    path_tokens: dict[int, list[int]] = field(default_factory=dict)  # path -> new ids (tags too)
    path_finish: dict[int, str] = field(default_factory=dict)  # path -> end | budget | cut
    summary_tokens: list[int] = field(default_factory=list)  # new ids (the template first)
    summary_finish: str | None = None  # end | budget
    request: Request | None = None  # the ended request, on its last Delta only
    error: str | None = None  # why it did not finish (with request, or alone if never added)
    is_internal: bool = False  # the error is the server's fault (HTTP 500), not the request's
    is_shutdown: bool = False  # ended because the server is shutting down (HTTP 503)

    @property
    def is_final(self) -> bool:
        return self.request is not None or self.error is not None

    def is_empty(self) -> bool:
        return not (self.path_tokens or self.path_finish or self.summary_tokens
                    or self.summary_finish or self.is_final)


@dataclass
class _Tracked:
    req: Request
    publish: Callable[[Delta], None]
    stream: bool  # publish every step, or only the final Delta
    sent_path: list[int]
    sent_finish: list[bool]
    sent_summary: int = 0
    is_started: bool = False


class EngineLoop:
    def __init__(self, engine: Engine, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics or Metrics(engine.block_manager.num_blocks)
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._tracked: dict[str, _Tracked] = {}
        self._thread = threading.Thread(target=self._run, name="parathinker-engine", daemon=True)

    # ----- called from any thread
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Abort everything in flight and end the thread."""
        if self._thread.is_alive():
            self._commands.put(("stop",))
            self._thread.join(timeout)

    def fail_all(self, why: str) -> None:
        """End every request in flight now (blocks freed); handlers get `is_shutdown` Deltas."""
        self._commands.put(("fail_all", why))

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
            publish: Callable[[Delta], None], stream: bool = True) -> None:
        """Queue a validated request; `publish` is called on the engine thread with each Delta."""
        self._commands.put(("add", request_id, prompt_ids, params, publish, stream))

    def abort(self, request_id: str) -> None:
        """Stop the request and free its blocks (a no-op if it already ended)."""
        self._commands.put(("abort", request_id))

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
                    if cmd[0] == "stop":
                        self._fail_all("the server is shutting down", is_shutdown=True)
                        return
                    if cmd[0] == "fail_all":
                        self._fail_all(cmd[1], is_shutdown=True)
                        continue
                    self._apply(cmd)
                if self.engine.has_unfinished():
                    self._step()
                self._snapshot()
            except Exception as e:  # never let the thread die with requests waiting on it
                log.exception("engine loop error")
                self._fail_all(f"internal server error: {e!r}", is_internal=True)

    def _apply(self, cmd: tuple[Any, ...]) -> None:
        if cmd[0] == "abort":
            self.engine.abort(cmd[1])
            return
        _, rid, prompt_ids, params, publish, stream = cmd
        try:
            req = self.engine.add_request(rid, prompt_ids, params)
        except Exception as e:
            self.metrics.inc("parathinker_requests_total", status="failed")
            _safe(publish, Delta(error=f"could not add the request: {e}", is_internal=True))
            return
        n = params.num_paths
        self._tracked[rid] = _Tracked(req, publish, stream, [0] * n, [False] * n)

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
            self._publish(t, is_final=rid in ended_ids)

    def _publish(self, t: _Tracked, is_final: bool, error: str | None = None,
                 is_internal: bool = False, is_shutdown: bool = False) -> None:
        req, m, d = t.req, self.metrics, Delta()
        if not t.is_started and req.num_forward_tokens > 0:  # prefilled: its paths have started
            t.is_started = True
            m.inc("parathinker_paths_started_total", len(req.paths))
            m.inc("parathinker_tokens_total", len(req.prompt.tokens), kind="prompt")
        for k, path in enumerate(req.paths):
            if len(path.tokens) > t.sent_path[k]:
                d.path_tokens[k] = path.tokens[t.sent_path[k]:]
                m.inc("parathinker_tokens_total", len(d.path_tokens[k]), kind="path")
                t.sent_path[k] = len(path.tokens)
            reason = req.path_finish[k]
            if reason is not None and not t.sent_finish[k]:
                d.path_finish[k] = reason
                t.sent_finish[k] = True
                m.inc("parathinker_paths_finished_total", reason=reason)
                if reason == "cut":
                    m.inc("parathinker_paths_cut_total")
        if req.summary is not None and len(req.summary.tokens) > t.sent_summary:
            d.summary_tokens = req.summary.tokens[t.sent_summary:]
            m.inc("parathinker_tokens_total", len(d.summary_tokens), kind="summary")
            t.sent_summary = len(req.summary.tokens)
        if req.status == FINISHED:
            d.summary_finish = req.summary_finish
        if is_final:
            d.request, d.is_internal, d.is_shutdown = req, is_internal, is_shutdown
            d.error = error or (None if req.status == FINISHED else req.error or req.status)
            m.inc("parathinker_requests_total", status=req.status if error is None else "failed")
            if req.status == FINISHED and req.finish_time is not None:
                m.inc("parathinker_request_latency_seconds_sum", req.finish_time - req.arrival_time)
                m.inc("parathinker_request_latency_seconds_count")
            del self._tracked[req.request_id]
        if is_final or (t.stream and not d.is_empty()):
            _safe(t.publish, d)

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
        bm, sched, m = self.engine.block_manager, self.engine.scheduler, self.metrics
        m.set("parathinker_kv_cache_blocks_used", bm.num_used)
        m.set("parathinker_kv_cache_blocks_total", bm.num_blocks)
        m.set("parathinker_requests_running", len(sched.running))
        m.set("parathinker_requests_waiting", len(sched.waiting))


def _safe(publish: Callable[[Delta], None], delta: Delta) -> None:
    try:
        publish(delta)
    except Exception:  # e.g. the event loop is already closed at shutdown
        log.debug("could not publish a delta", exc_info=True)
