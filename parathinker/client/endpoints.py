"""Many OpenAI-compatible servers as one: spread work by load, survive the loss of some.

    servers = [Server(url, timeout_s=600) for url in endpoint_urls(["http://a:8000,http://b:8000"])]
    dispatch = Dispatcher(servers, concurrency=64, retries=5)
    for tag, outputs, server in dispatch.run((tag, [call, ...]) for ...):
        ...   # every call(server) of one job ran on that one server

A job is a list of calls (e.g. the N traces of a majority vote); all of a job's calls run on one
server, so a record names the server that produced it. A free slot takes the next job: each
server has at most `concurrency` calls in flight, and the least loaded server goes first, so a
slow server holds back only its own jobs. A server that stops answering (connection refused or
reset, a timeout, HTTP 5xx) is taken out of rotation with a warning; the jobs it had in flight go
back to the queue (their partial results are dropped, and late answers from it are ignored), and
it is probed again after 1, 2, 4, ... s (at most 60 s); so is one that was down from the start
(`Server.probe` then fetches its model card, and `accepts` says whether it may take the jobs).
After `retries` failures in a row it is dropped for the rest of the run; the run fails
(EndpointError) only when every server is dropped.
HTTP 429 (a full queue) puts a job back without counting against the server. Any other error
(400, 401, 404: the request or the setup is wrong) stops the run with an EndpointError.

Every HTTP call has a finite timeout: a call `timeout_s` (--request-timeout), a model-list probe
at most 15 s (never more than `timeout_s`). Each call runs on a daemon thread, so a run stopped by
an error does not keep the process waiting on the requests it abandoned.
"""

from __future__ import annotations

import concurrent.futures as cf
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

MAX_BACKOFF_S = 60.0
PROBE_TIMEOUT_S = 15.0  # a /v1/models probe; capped by --request-timeout


class EndpointError(RuntimeError):
    """An endpoint could not be reached or refused a request (the message names the URL)."""


def normalize_endpoint(url: str) -> str:
    """`http://host:8000` or `http://host:8000/v1` -> the client's base URL (`.../v1`)."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"--endpoint must be an http(s) URL such as http://127.0.0.1:8000/v1 (or a "
                         f"file of them, one a line), got {url!r}")
    url = url.rstrip("/")
    return url + "/v1" if parsed.path in ("", "/") else url


def endpoint_urls(values: Iterable[str]) -> tuple[str, ...]:
    """URLs from --endpoint values: each a URL, a comma list, or a file of URLs (one a line, `#`
    comments); normalized (`.../v1`), in order, each once."""
    out: list[str] = []
    for value in values:
        for item in (v.strip() for v in value.split(",")):
            if not item:
                continue
            if not item.startswith(("http://", "https://")) and Path(item).is_file():
                lines = Path(item).read_text(encoding="utf-8").splitlines()
                items = [ln.split("#", 1)[0].strip() for ln in lines]
                urls = [normalize_endpoint(u) for u in items if u]
                if not urls:
                    raise ValueError(f"--endpoint file {item} lists no URL")
                out += urls
            else:
                out.append(normalize_endpoint(item))
    if not out:
        raise ValueError("--endpoint needs at least one URL")
    return tuple(dict.fromkeys(out))


class _Down(Exception):
    """The server failed (connection, timeout, 5xx): out of rotation, its jobs go elsewhere."""


class _Busy(Exception):
    """The server is full (429): the job goes back to the queue."""


class Server:
    """One endpoint: its openai client, its model card and its share of the run."""

    def __init__(self, url: str, timeout_s: float = 3600.0, api_key: str | None = None,
                 model: str | None = None) -> None:
        try:
            import openai
        except ImportError as e:
            raise ValueError("--endpoint needs the openai package: pip install openai") from e
        self._openai = openai
        self.url = normalize_endpoint(url)
        self.timeout_s, self.api_key = timeout_s, api_key
        self.client = self._new_client()
        self.model = model  # the served model a probe fetches the card of, when it has none yet
        self.card: dict[str, Any] | None = None  # its /v1/models entry for the model
        self.in_flight = 0
        self.failures = 0  # in a row; a successful call resets it
        self.retry_at: float | None = None  # out of rotation until then (then probed)
        self.dropped = False
        self.down = False  # out of rotation for a failure (not for a full queue): probed
        self.last_error = ""
        self.num_jobs = self.num_tokens = 0
        self.first_start: float | None = None
        self.last_end: float | None = None

    def _new_client(self) -> Any:
        # no retries in the client: the dispatcher retries, elsewhere if it can
        return self._openai.OpenAI(base_url=self.url, api_key=self.api_key or "EMPTY",
                                   timeout=self.timeout_s, max_retries=0)

    def reset_client(self) -> None:
        """End the requests still in flight (their answers are no longer wanted)."""
        self.client.close()
        self.client = self._new_client()

    def list_models(self) -> Any:
        """GET /v1/models within the probe timeout."""
        return self.client.with_options(timeout=min(PROBE_TIMEOUT_S, self.timeout_s)).models.list()

    def probe(self) -> Any:
        """Is it back? Its card when it has none yet (down since the start), else its model list."""
        return self.fetch_card(self.model) if self.card is None and self.model else self.list_models()

    @property
    def is_parathinker(self) -> bool:
        """Its model card says it is `parathinker serve` (paths in every answer)."""
        return (self.card or {}).get("owned_by") == "parathinker"

    @property
    def in_rotation(self) -> bool:
        return not self.dropped and self.retry_at is None

    def error(self, e: Exception) -> Exception:
        """An exception of a call as _Down, _Busy or a final EndpointError naming the URL."""
        openai = self._openai
        if isinstance(e, (openai.APIConnectionError, openai.APITimeoutError)):  # timeout first: a subclass
            return _Down(f"cannot reach the endpoint {self.url}: {type(e).__name__}: {e}")
        if isinstance(e, openai.AuthenticationError):
            return EndpointError(f"the endpoint {self.url} refused the API key (401); pass --api-key "
                                 "or set OPENAI_API_KEY")
        if isinstance(e, openai.APIStatusError):
            msg = f"the endpoint {self.url} answered HTTP {e.status_code}: {e.message}"
            if e.status_code == 429:
                return _Busy(msg)
            return _Down(msg) if e.status_code >= 500 else EndpointError(msg)
        if isinstance(e, (EndpointError, _Down, _Busy)):
            return e
        return EndpointError(f"request to the endpoint {self.url} failed: {type(e).__name__}: {e}")

    def fetch_card(self, model: str) -> dict[str, Any]:
        """The server's model card for `model` ({} when it has no /models route); EndpointError when
        it does not serve that model, _Down when it does not answer."""
        try:
            listed = self.list_models()
        except self._openai.NotFoundError:
            self.card = {}
            return self.card
        except Exception as e:  # noqa: BLE001 - every failure becomes one clear message
            raise self.error(e) from None
        cards = {m.id: m.model_dump() for m in listed}
        if cards and model not in cards:
            raise EndpointError(f"the endpoint {self.url} does not serve model {model!r}; it serves "
                                f"{', '.join(cards)} (pass one of them as --model)")
        self.card = cards.get(model, {})
        return self.card

    def stats(self) -> dict[str, Any]:
        span = (self.last_end - self.first_start) if self.first_start and self.last_end else 0.0
        return {"samples": self.num_jobs, "generated_tokens": self.num_tokens, "active_s": round(span, 3),
                "samples_per_min": round(60 * self.num_jobs / span, 3) if span > 0 else None,
                "tokens_per_s": round(self.num_tokens / span, 3) if span > 0 else None,
                "status": "dropped" if self.dropped else ("down" if self.down else "up"),
                "last_error": self.last_error or None,
                # what it runs (parathinker serve reports its engine's rope scaling and layout)
                "card": {k: self.card[k] for k in ("owned_by", "max_model_len", "layout", "rope_scaling")
                         if k in self.card} if self.card else None}


@dataclass(eq=False)
class _Attempt:
    tag: Any
    calls: list[Callable[[Server], Any]]
    server: Server | None = None
    outputs: list[Any] = field(default_factory=list)
    num_done: int = 0
    live: bool = True


def _spawn(fn: Callable[..., Any], *args: Any) -> cf.Future[Any]:
    """fn(*args) on a daemon thread: a call abandoned by a stopped run (it may wait up to its
    timeout) never holds up the process's exit, as a ThreadPoolExecutor's workers would."""
    fut: cf.Future[Any] = cf.Future()

    def run() -> None:
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to whoever reads the future
            fut.set_exception(e)

    fut.set_running_or_notify_cancel()
    threading.Thread(target=run, name="eval-endpoint", daemon=True).start()
    return fut


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


class Dispatcher:
    """Runs jobs on many servers by load, moving a lost server's jobs to the others."""

    def __init__(self, servers: list[Server], concurrency: int, retries: int = 5,
                 backoff_s: float = 1.0, warn: Callable[[str], None] = _warn) -> None:
        if concurrency < 1 or retries < 1:
            raise ValueError(f"concurrency and retries must be >= 1, got {concurrency}, {retries}")
        if not servers:
            raise ValueError("no server to run on")
        self.servers, self.concurrency, self.retries = servers, concurrency, retries
        self.backoff_s, self.warn = backoff_s, warn

    def fail(self, server: Server, why: str) -> None:
        """A failure of `server`: out of rotation (probed after a backoff), or dropped."""
        server.failures += 1
        server.last_error, server.down = why, True
        if server.failures >= self.retries:
            server.dropped, server.retry_at = True, None
            self.warn(f"{why}; dropped after {server.failures} failure(s) in a row")
        else:
            wait = min(MAX_BACKOFF_S, self.backoff_s * 2 ** (server.failures - 1))
            server.retry_at = time.monotonic() + wait
            self.warn(f"{why}; out of rotation, retried in {wait:g} s")

    def _no_server_left(self, servers: list[Server]) -> EndpointError:
        why = "; ".join(f"{s.url}: {s.last_error or 'dropped'}" for s in servers)
        return EndpointError(f"no endpoint is left to run on ({why})")

    def run(self, jobs: Iterable[tuple[Any, list[Callable[[Server], Any]]]],
            servers: list[Server] | None = None,
            count_tokens: Callable[[list[Any]], int] = lambda outputs: 0,
            accepts: Callable[[Server], bool] = lambda server: True,
            ) -> Iterator[tuple[Any, list[Any], Server]]:
        """Yields (tag, outputs, server) for each job as soon as its last call has returned.
        `accepts(server)`: whether a server that answers again (one down since the start, whose
        card was unknown) may take these jobs."""
        servers = servers or self.servers
        excluded: set[Server] = set()
        source = iter(jobs)
        queue: deque[_Attempt] = deque()
        is_exhausted = False
        calls: dict[cf.Future[Any], tuple[_Attempt, int]] = {}
        probes: dict[cf.Future[Any], Server] = {}

        def requeue(att: _Attempt) -> None:
            att.live = False
            queue.appendleft(_Attempt(att.tag, att.calls))

        def launch(att: _Attempt, server: Server) -> None:
            att.server, att.outputs = server, [None] * len(att.calls)
            server.first_start = server.first_start or time.monotonic()
            for slot, call in enumerate(att.calls):
                server.in_flight += 1
                calls[_spawn(call, server)] = (att, slot)

        try:
            while True:
                now = time.monotonic()
                for s in servers:  # back after a full queue's pause; probe one that failed
                    if s.retry_at is None or s.retry_at > now or s in probes.values():
                        continue
                    if s.down:
                        probes[_spawn(s.probe)] = s
                    else:
                        s.retry_at = None
                while True:  # fill free slots, least loaded server first
                    if not queue and not is_exhausted:
                        job = next(source, None)
                        if job is None:
                            is_exhausted = True
                        else:
                            queue.append(_Attempt(*job))
                    if not queue:
                        break
                    att = queue[0]
                    room = [s for s in servers if s.in_rotation and s not in excluded and
                            (s.in_flight == 0 or s.in_flight + len(att.calls) <= self.concurrency)]
                    if not room:
                        break
                    queue.popleft()
                    launch(att, min(room, key=lambda s: s.in_flight))
                live = [a for a, _ in calls.values() if a.live]
                if not queue and is_exhausted and not live:
                    return
                if all(s.dropped or s in excluded for s in servers):
                    raise self._no_server_left(servers)
                due = [s.retry_at for s in servers if s.retry_at is not None and s not in probes.values()]
                timeout = max(0.0, min(due) - time.monotonic()) if due else None
                if not calls and not probes:
                    time.sleep(timeout or 0.05)
                    continue
                done, _ = cf.wait(list(calls) + list(probes), timeout=timeout,
                                  return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    if fut in probes:
                        s = probes.pop(fut)
                        if fut.exception() is None:
                            s.retry_at, s.down = None, False
                            if accepts(s):
                                self.warn(f"the endpoint {s.url} answers again: back in rotation")
                            else:  # up since the start, but not of this kind: not used for these jobs
                                excluded.add(s)
                        else:
                            self.fail(s, str(s.error(fut.exception())))  # type: ignore[arg-type]
                        continue
                    att, slot = calls.pop(fut)
                    server = att.server
                    assert server is not None
                    server.in_flight -= 1
                    if not att.live:
                        continue  # a late answer for a job that was moved elsewhere
                    exc = fut.exception()
                    if exc is not None:
                        err = server.error(exc)  # type: ignore[arg-type]
                        if isinstance(err, EndpointError):
                            raise err
                        if isinstance(err, _Busy):
                            requeue(att)
                            if server.in_rotation:
                                server.retry_at = time.monotonic() + self.backoff_s
                            continue
                        for other, _ in list(calls.values()):  # every job on it goes elsewhere
                            if other.live and other.server is server:
                                requeue(other)
                        requeue(att)
                        if not server.dropped and not server.down:  # once per outage
                            self.fail(server, str(err))
                        continue
                    server.failures = 0
                    att.outputs[slot] = fut.result()
                    att.num_done += 1
                    if att.num_done == len(att.calls):
                        att.live = False
                        server.num_jobs += 1
                        server.num_tokens += count_tokens(att.outputs)
                        server.last_end = time.monotonic()
                        yield att.tag, att.outputs, server
        finally:
            for s in {a.server for a, _ in calls.values() if a.server is not None}:
                s.reset_client()  # stop waiting on answers nobody will read
