"""Where eval requests run: the project's engine, or any OpenAI-compatible HTTP endpoint.

    backend = EngineBackend(llm)                      # parathinker, sequential and majority
    backend = EndpointBackend(url, model, timeout_s)  # sequential and majority (vLLM, SGLang, ...)
    for job, outputs in backend.run(jobs, max_in_flight=64):
        ...   # a job (one sample) as soon as all of its requests have finished

A `Job` is one sample: one ParaThinker request (SamplingParams) or one or more plain traces
(PlainParams, e.g. the N traces a majority vote needs). Jobs are fed lazily so that at most
`max_in_flight` requests are running; each job is yielded the moment its last request ends, so
the caller can store it at once. A ParaThinker job yields its `RequestOutput`; a plain job one
`Trace` per request. Sampling uses each request's own seed, so an output does not depend on what
else ran beside it (the engine keeps one generator per request; servers such as vLLM honour a
per-request `seed` too).
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from parathinker.config import PlainParams, SamplingParams
from parathinker.tokens import SEQUENTIAL_PROMPT_TEMPLATE, last_boxed


class EndpointError(RuntimeError):
    """The HTTP endpoint could not be reached or refused a request (the message names the URL)."""


@dataclass(frozen=True)
class Job:
    index: int  # the caller's handle (position in its plan)
    question: str
    params: tuple[SamplingParams | PlainParams, ...]  # one ParaThinker request, or N plain traces

    @property
    def is_parathinker(self) -> bool:
        return isinstance(self.params[0], SamplingParams)


@dataclass
class Trace:
    """One plain reasoning trace, whichever backend produced it."""

    text: str
    finish_reason: str  # "end" (EOS / stop) | "budget" (max tokens)
    num_prompt_tokens: int | None
    num_tokens: int | None
    latency_s: float
    error: str | None = None

    @property
    def answer(self) -> str | None:
        return last_boxed(self.text)


@dataclass
class _Pending:
    job: Job
    outputs: list[Any] = field(default_factory=list)
    num_done: int = 0


def _check_in_flight(max_in_flight: int) -> None:
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")


# ----- the project's engine
class EngineBackend:
    """Runs jobs through one `LLM`'s engine with continuous batching."""

    def __init__(self, llm: Any, sequential_template: str = SEQUENTIAL_PROMPT_TEMPLATE) -> None:
        self.llm = llm
        self.sequential_template = sequential_template
        self._num_requests = 0
        self._ids: dict[tuple[bool, str], list[int]] = {}

    def encode(self, job: Job) -> list[int]:
        """Prompt ids of a job; ValueError when a request of it cannot run (too long, ...)."""
        llm, key = self.llm, (job.is_parathinker, job.question)
        if key not in self._ids:
            text = job.question if job.is_parathinker else \
                self.sequential_template.replace("{question}", job.question)
            (self._ids[key],) = llm.encode_prompts([text], None, apply_template=job.is_parathinker)
        ids = self._ids[key]
        if job.is_parathinker:
            for p in job.params:
                llm.validate(ids, p)
            return ids
        limit = llm.config.max_position_embeddings
        for p in job.params:
            assert isinstance(p, PlainParams)
            if len(ids) + p.max_tokens > limit:
                raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({p.max_tokens}) exceed the "
                                 f"model's context ({limit} positions); lower the budget")
        return ids

    def _trace(self, req: Any) -> Trace:
        from parathinker.engine.request import FINISHED

        latency = (req.finish_time or time.perf_counter()) - req.arrival_time
        tokens = req.trace.tokens
        text = self.llm.tokenizer.decode(tokens[:-1] if req.trace_finish == "end" else tokens,
                                         skip_special_tokens=False)
        error = None if req.status == FINISHED else (req.error or f"request {req.status}")
        return Trace(text, str(req.trace_finish), len(req.prompt.tokens), len(tokens), latency, error)

    def run(self, jobs: Iterable[Job], max_in_flight: int) -> Iterator[tuple[Job, list[Any]]]:
        _check_in_flight(max_in_flight)
        engine = self.llm.engine
        pending_jobs = iter(jobs)
        by_request: dict[str, tuple[_Pending, int]] = {}
        is_exhausted = False
        while True:
            while not is_exhausted and len(by_request) < max_in_flight:
                job = next(pending_jobs, None)
                if job is None:
                    is_exhausted = True
                    break
                ids = self.encode(job)
                state = _Pending(job, [None] * len(job.params))
                for slot, params in enumerate(job.params):
                    self._num_requests += 1
                    rid = f"eval-{self._num_requests}"
                    engine.add_request(rid, self.llm.engine_prompt(ids) if job.is_parathinker
                                       else list(ids), params)
                    by_request[rid] = (state, slot)
            if not engine.has_unfinished():
                return
            for req in engine.step():
                if req.request_id not in by_request:
                    continue
                state, slot = by_request.pop(req.request_id)
                state.outputs[slot] = (self.llm.request_output(req) if state.job.is_parathinker
                                       else self._trace(req))
                state.num_done += 1
                if state.num_done == len(state.job.params):
                    yield state.job, state.outputs


# ----- an OpenAI-compatible endpoint
def normalize_endpoint(url: str) -> str:
    """`http://host:8000` or `http://host:8000/v1` -> the client's base URL (`.../v1`)."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"--endpoint must be an http(s) URL such as http://127.0.0.1:8000/v1, got {url!r}")
    url = url.rstrip("/")
    return url + "/v1" if parsed.path in ("", "/") else url


class EndpointBackend:
    """Plain traces from an OpenAI-compatible completions endpoint (one HTTP request per trace).

    The prompt is the sequential template's text (the server tokenizes it and adds BOS);
    `max_tokens`, `temperature`, `top_p` and `seed` come from each trace's PlainParams (`top_k`
    goes in `extra_body`, as vLLM and SGLang accept it)."""

    def __init__(self, url: str, model: str, timeout_s: float = 3600.0, api_key: str | None = None,
                 max_retries: int = 2, sequential_template: str = SEQUENTIAL_PROMPT_TEMPLATE) -> None:
        try:
            import openai
        except ImportError as e:
            raise ValueError("--endpoint needs the openai package: pip install openai") from e
        self.url = normalize_endpoint(url)
        self.model = model
        self.sequential_template = sequential_template
        self._openai = openai
        self.client = openai.OpenAI(base_url=self.url, api_key=api_key or "EMPTY", timeout=timeout_s,
                                    max_retries=max_retries)

    def _error(self, e: Exception) -> EndpointError:
        openai = self._openai
        if isinstance(e, (openai.APIConnectionError, openai.APITimeoutError)):
            return EndpointError(f"cannot reach the endpoint {self.url}: {type(e).__name__}: {e}")
        if isinstance(e, openai.AuthenticationError):
            return EndpointError(f"the endpoint {self.url} refused the API key (401); pass --api-key "
                                 "or set OPENAI_API_KEY")
        if isinstance(e, openai.APIStatusError):
            return EndpointError(f"the endpoint {self.url} answered HTTP {e.status_code}: {e.message}")
        return EndpointError(f"request to the endpoint {self.url} failed: {type(e).__name__}: {e}")

    def check(self) -> list[str]:
        """Fail fast, naming the URL, when the server is down or does not serve `model`."""
        try:
            served = [m.id for m in self.client.with_options(max_retries=0, timeout=15.0).models.list()]
        except self._openai.NotFoundError:
            return []  # no /models route: the first completion will tell
        except Exception as e:  # noqa: BLE001 - every failure becomes one clear message
            raise self._error(e) from None
        if served and self.model not in served:
            raise EndpointError(f"the endpoint {self.url} does not serve model {self.model!r}; it serves "
                                f"{', '.join(served)} (pass one of them as --model)")
        return served

    def complete(self, question: str, params: PlainParams) -> Trace:
        extra = {"top_k": params.top_k} if params.top_k > 0 else None
        start = time.perf_counter()
        try:
            resp = self.client.completions.create(
                model=self.model, prompt=self.sequential_template.replace("{question}", question),
                max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                seed=params.seed, n=1, extra_body=extra)
        except Exception as e:  # noqa: BLE001
            raise self._error(e) from None
        latency = time.perf_counter() - start
        if not resp.choices:
            raise EndpointError(f"the endpoint {self.url} answered without choices")
        choice = resp.choices[0]
        usage = resp.usage
        finish = "budget" if choice.finish_reason == "length" else "end"
        return Trace(choice.text or "", finish, usage.prompt_tokens if usage else None,
                     usage.completion_tokens if usage else None, latency)

    def run(self, jobs: Iterable[Job], max_in_flight: int) -> Iterator[tuple[Job, list[Any]]]:
        _check_in_flight(max_in_flight)
        pending_jobs = iter(jobs)
        futures: dict[cf.Future[Trace], tuple[_Pending, int]] = {}
        pool = cf.ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="eval-endpoint")
        is_exhausted = False
        try:
            while True:
                while not is_exhausted and len(futures) < max_in_flight:
                    job = next(pending_jobs, None)
                    if job is None:
                        is_exhausted = True
                        break
                    if job.is_parathinker:
                        raise ValueError("parathinker mode runs on the project's engine; --endpoint "
                                         "serves the sequential and majority modes")
                    state = _Pending(job, [None] * len(job.params))
                    for slot, params in enumerate(job.params):
                        assert isinstance(params, PlainParams)
                        futures[pool.submit(self.complete, job.question, params)] = (state, slot)
                if not futures:
                    return
                done, _ = cf.wait(list(futures), return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    state, slot = futures.pop(fut)
                    state.outputs[slot] = fut.result()  # an EndpointError stops the run here
                    state.num_done += 1
                    if state.num_done == len(state.job.params):
                        yield state.job, state.outputs
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            if futures:  # stopped early: end the requests still in flight instead of waiting on them
                self.client.close()

