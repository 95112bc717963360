"""Where eval requests run: the project's engine, or any OpenAI-compatible HTTP endpoint.

    backend = EngineBackend(llm)                      # parathinker, sequential and majority
    for job, outputs in backend.run(jobs, max_in_flight=64):
        ...   # a job (one sample) as soon as all of its requests have finished
    backend = EndpointBackend(urls, model, timeout_s, concurrency=64)  # one or many servers
    for job, outputs, server_url in backend.run(jobs, layout="native"):   # layout None: plain traces
        ...

A `Job` is one sample: one ParaThinker request (SamplingParams) or one or more plain traces
(PlainParams, e.g. the N traces a majority vote needs). Jobs are fed lazily so that at most
`max_in_flight` requests are running; each job is yielded the moment its last request ends, so
the caller can store it at once. A ParaThinker job yields its `RequestOutput` from the engine, a
`ParallelResult` (the same fields, counted rather than as token ids) from `parathinker serve`; a
plain job one `Trace` per request. Endpoints: `parathinker serve` runs ParaThinker requests (its
`parallel` extension, docs/SERVE.md), any other OpenAI-compatible server (vLLM, SGLang) plain
traces; a run spreads over all of them by load (eval/endpoints.py). Sampling uses each
request's own seed, so an output does not depend on what else ran beside it (the engine keeps
one generator per request; `parathinker serve` is that engine, and servers such as vLLM honour a
per-request `seed` too).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from parathinker.config import PlainParams, SamplingParams
from parathinker.client.endpoints import Dispatcher, EndpointError, Server, endpoint_urls, normalize_endpoint
from parathinker.spec.tokens import SEQUENTIAL_PROMPT_TEMPLATE, last_boxed

__all__ = ["EndpointBackend", "EndpointError", "EngineBackend", "Job", "ParallelResult", "Trace",
           "endpoint_urls", "normalize_endpoint"]


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
        for p in job.params:
            assert isinstance(p, PlainParams)
            llm.validate_trace(ids, p)
        return ids

    def _trace(self, req: Any) -> Trace:
        from parathinker.engine.outputs import trace_output

        out = trace_output(req, self.llm.tokenizer)
        return Trace(out.text, out.finish_reason, len(out.prompt_token_ids), len(out.token_ids),
                     out.metrics["latency_s"], out.error)

    def run(self, jobs: Iterable[Job], max_in_flight: int,
            on_tokens: Callable[[int], None] | None = None) -> Iterator[tuple[Job, list[Any]]]:
        """`on_tokens(n)` after every engine step, with the n tokens it sampled (a progress bar's
        sign of life while a long sample is still running)."""
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
            sampled = engine.num_sampled_tokens
            ended = engine.step()
            if on_tokens is not None:
                on_tokens(engine.num_sampled_tokens - sampled)
            for req in ended:
                if req.request_id not in by_request:
                    continue
                state, slot = by_request.pop(req.request_id)
                state.outputs[slot] = (self.llm.request_output(req) if state.job.is_parathinker
                                       else self._trace(req))
                state.num_done += 1
                if state.num_done == len(state.job.params):
                    yield state.job, state.outputs


# ----- OpenAI-compatible endpoints
@dataclass
class PathResult:
    text: str  # without its two tags
    finish_reason: str  # "end" | "budget" | "cut" | "pruned"
    num_tokens: int  # tags included
    confidence: float | None = None  # the path's lowest group confidence (None: not computed)


@dataclass
class ParallelResult:
    """One ParaThinker request's outcome in the fields a record needs, from either backend."""

    paths: list[PathResult]
    summary_text: str  # the forced template included, <summary> / </summary> not
    summary_finish: str  # "end" | "budget" (or why the request did not run)
    num_prompt_tokens: int  # the prompt the engine ran (padded in the reference layout)
    num_summary_tokens: int  # the summary's tokens, its template included
    latency_s: float | None
    error: str | None = None

    @classmethod
    def of(cls, out: Any) -> ParallelResult:
        """From an engine `RequestOutput`."""
        paths = [PathResult(p.text, p.finish_reason, len(p.token_ids), p.confidence)
                 for p in out.paths]
        return cls(paths, out.summary.text, out.summary.finish_reason, len(out.prompt_token_ids),
                   len(out.summary.token_ids), out.metrics.get("latency_s"), out.error)


_UNSET = object()


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


_SUMMARY_FINISH = {"stop": "end", "length": "budget"}  # the server's mapping (serve/responses.py), reversed


class EndpointBackend:
    """Requests on one or more OpenAI-compatible servers, spread by load (eval/endpoints.py).

    Plain traces: `/v1/completions` with the sequential template's text (the server tokenizes it
    and adds BOS); `max_tokens`, `temperature`, `top_p`, `seed` from each trace's PlainParams,
    `top_k` in `extra_body` (vLLM and SGLang accept it). They go to servers other than
    `parathinker serve`, which thinks in parallel on every request. ParaThinker requests:
    `/v1/chat/completions` on `parathinker serve` (its default `--chat-template parathinker` puts
    the question into the model's prompt template, as the engine does) with every SamplingParams
    field in the `parallel` extension (the gating ones only when confidence or a gate is on, so an
    ungated run also works with a server older than them), so that the server's defaults and
    budget fitting never apply; paths' `confidence` come back in `PathResult`; only servers of
    the requested layout take them."""

    def __init__(self, urls: str | tuple[str, ...], model: str, timeout_s: float = 3600.0,
                 api_key: str | None = None, concurrency: int = 64, retries: int = 5,
                 sequential_template: str = SEQUENTIAL_PROMPT_TEMPLATE, backoff_s: float = 1.0) -> None:
        urls = endpoint_urls([urls] if isinstance(urls, str) else urls)
        self.model = model
        self.sequential_template = sequential_template
        self.servers = [Server(u, timeout_s, api_key, model) for u in urls]
        self.dispatcher = Dispatcher(self.servers, concurrency, retries, backoff_s)
        self._cards: tuple[tuple[str, ...], dict[str, Any], bool] = (("native",), {}, True)

    @property
    def url(self) -> str:
        return ", ".join(s.url for s in self.servers)

    def check(self) -> None:
        """Fail fast, naming the URL, when a server does not serve `model`, or when none answers;
        one that does not answer is left out with a warning and probed again as the run goes (it
        joins when it answers with a card of the kind, and the settings, of the jobs running)."""
        down: list[tuple[Server, str]] = []
        for s in self.servers:
            try:
                s.fetch_card(self.model)
            except EndpointError:
                raise
            except Exception as e:  # noqa: BLE001 - _Down: not answering
                down.append((s, str(e)))
        if len(down) == len(self.servers):
            raise EndpointError("no endpoint answers: " + "; ".join(why for _, why in down))
        for s, why in down:
            self.dispatcher.fail(s, f"{why}; not used until it answers")

    def check_cards(self, layouts: tuple[str, ...], want: dict[str, Any], parallel: bool = True,
                    late: Server | None = None) -> None:
        """ValueError, naming the server and the field, before anything runs: a `parathinker serve`
        of a layout this run does not ask for (`parallel`: the run has parathinker mode), or servers
        of one kind that report a different `rope_scaling` or `max_model_len` in /v1/models than
        the run's (`want`: what --model's config.json and an explicit --rope-scaling say, for
        parathinker servers) or than each other (`late`, a server that joins midway, is compared
        last: the others ran already). The arguments are kept for the servers that join later."""
        self._cards = (layouts, want, parallel)
        for s in self.servers_for("native") + self.servers_for("reference") if parallel else ():
            if s.card.get("layout", "native") not in layouts:
                raise ValueError(f"the endpoint {s.url} runs `parathinker serve --layout "
                                 f"{s.card.get('layout', 'native')}`; parathinker mode in the "
                                 f"{','.join(layouts)} layout needs a `parathinker serve --layout "
                                 f"{layouts[0]}` endpoint (leave it out, or add its --layout)")
        for kind in (*layouts, None):
            for name in ("rope_scaling", "max_model_len"):
                ref = want.get(name, _UNSET) if kind is not None else _UNSET
                whose = f"this run (--model {self.model})"
                known = [s for s in self.servers_for(kind) if name in s.card]
                for s in sorted(known, key=lambda s: s is late):
                    if ref is _UNSET:
                        ref, whose = s.card[name], f"the endpoint {s.url}"
                    elif _canonical(s.card[name]) != _canonical(ref):
                        raise ValueError(f"the endpoint {s.url} reports {name} {s.card[name]!r} in "
                                         f"/v1/models, but {whose} has {ref!r}: its samples would not "
                                         "be comparable; serve the same model with the same settings")

    def contexts(self, layouts: tuple[str, ...]) -> dict[str | None, int]:
        """The least `max_model_len` of the servers of each kind of job (a layout; None: plain
        traces) that report one, for eval/fit.py."""
        out: dict[str | None, int] = {}
        for kind in (*layouts, None):
            lens = [int(s.card["max_model_len"]) for s in self.servers_for(kind)
                    if s.card.get("max_model_len")]
            if lens:
                out[kind] = min(lens)
        return out

    def servers_for(self, layout: str | None) -> list[Server]:
        """The servers known to run a job of this kind (layout None: plain traces)."""
        live = [s for s in self.servers if not s.dropped and s.card is not None]
        if layout is None:
            return [s for s in live if not s.is_parathinker]
        return [s for s in live if s.is_parathinker and s.card.get("layout", "native") == layout]

    def validate(self, layout: str | None, num_paths: int) -> None:
        """ValueError before anything runs when no answering server can take these jobs."""
        if self.servers_for(layout):
            for s in self.servers_for(layout):
                if layout is not None and num_paths > int(s.card.get("max_paths") or num_paths):
                    raise ValueError(f"the endpoint {s.url} serves at most {s.card['max_paths']} paths; "
                                     f"--paths asks for {num_paths}")
                if layout is not None and "summary_template_tokens" not in s.card:
                    raise ValueError(f"the endpoint {s.url} does not report summary_template_tokens in "
                                     "/v1/models (a parathinker serve older than this eval): upgrade it")
            return
        kinds = ", ".join(f"{s.url} ({(s.card or {}).get('owned_by', '?')}"
                          + (f", {s.card.get('layout')} layout" if s.is_parathinker else "") + ")"
                          for s in self.servers if not s.dropped)
        if layout is None:
            raise ValueError("sequential and majority traces need an OpenAI-compatible server other than "
                             f"parathinker serve (which thinks in parallel on every request), e.g. vLLM; "
                             f"the endpoints are {kinds}")
        raise ValueError(f"parathinker mode in the {layout} layout needs a `parathinker serve --layout "
                         f"{layout}` endpoint; the endpoints are {kinds}")

    def complete(self, server: Server, question: str, params: PlainParams) -> Trace:
        extra = {"top_k": params.top_k} if params.top_k > 0 else None
        start = time.perf_counter()
        resp = server.client.completions.create(
            model=self.model, prompt=self.sequential_template.replace("{question}", question),
            max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
            seed=params.seed, n=1, extra_body=extra)
        latency = time.perf_counter() - start
        if not resp.choices:
            raise EndpointError(f"the endpoint {server.url} answered without choices")
        choice = resp.choices[0]
        usage = resp.usage
        finish = "budget" if choice.finish_reason == "length" else "end"
        return Trace(choice.text or "", finish, usage.prompt_tokens if usage else None,
                     usage.completion_tokens if usage else None, latency)

    def parallel(self, server: Server, question: str, params: SamplingParams) -> ParallelResult:
        settings = {"num_paths": params.num_paths, "max_path_tokens": params.max_path_tokens,
                    "min_path_tokens": params.min_path_tokens,
                    "max_summary_tokens": params.max_summary_tokens,
                    "min_finished_paths": params.min_finished_paths}
        if params.is_gated or params.prune_confidence is not None:  # else a server before them works
            settings.update(confidence_window=params.confidence_window,
                            confidence_top_k=params.confidence_top_k,
                            prune_confidence=params.prune_confidence,
                            stop_on_agreement=params.stop_on_agreement)
        start = time.perf_counter()
        resp = server.client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": question}],
            temperature=params.temperature, top_p=params.top_p, seed=params.seed,
            extra_body={"parallel": settings, "top_k": params.top_k})
        latency = time.perf_counter() - start
        extra = (resp.choices[0].message.model_extra or {}) if resp.choices else {}
        usage = resp.usage.model_dump() if resp.usage else {}
        if "paths" not in extra or "summary_tokens" not in usage:
            raise EndpointError(f"the endpoint {server.url} answered without the parallel extension's "
                                "paths / usage.summary_tokens: is it parathinker serve?")
        choice = resp.choices[0]
        paths = [PathResult(p["text"], p["finish_reason"], int(p["num_tokens"]), p.get("confidence"))
                 for p in sorted(extra["paths"], key=lambda p: p["index"])]
        template = int(server.card["summary_template_tokens"])  # type: ignore[index]
        return ParallelResult(paths, choice.message.content or "",
                              _SUMMARY_FINISH.get(str(choice.finish_reason), str(choice.finish_reason)),
                              int(usage["prompt_tokens"]), int(usage["summary_tokens"]) + template, latency)

    def _calls(self, job: Job) -> list[Any]:
        if job.is_parathinker:
            (params,) = job.params
            return [lambda s, p=params: self.parallel(s, job.question, p)]  # type: ignore[misc]
        return [lambda s, p=p: self.complete(s, job.question, p) for p in job.params]  # type: ignore[misc]

    def run(self, jobs: Iterable[Job], layout: str | None) -> Iterator[tuple[Job, list[Any], str]]:
        """(job, outputs, the URL of the server that ran it) as each job finishes."""
        servers = self.servers_for(layout)
        unknown = [s for s in self.servers if s.card is None and not s.dropped]  # down since the start

        def accepts(late: Server) -> bool:
            """A server down at the start that answers now: of this kind, and as the others are."""
            try:
                self.check_cards(*self._cards, late=late)
            except ValueError as e:
                late.dropped, late.last_error = True, str(e)
                self.dispatcher.warn(f"{e}; not used in this run")
                return False
            if late not in self.servers_for(layout):
                self.dispatcher.warn(f"the endpoint {late.url} answers again, but runs other jobs "
                                     "than these: not used for them")
                return False
            return True

        for job, outputs, server in self.dispatcher.run(((j, self._calls(j)) for j in jobs),
                                                        servers + unknown, _generated_tokens, accepts):
            yield job, outputs, server.url

    def stats(self) -> dict[str, dict[str, Any]]:
        """This run's share of each server: samples, generated tokens, throughput, status."""
        return {s.url: s.stats() for s in self.servers}


def _generated_tokens(outputs: list[Any]) -> int:
    total = 0
    for o in outputs:
        if isinstance(o, ParallelResult):
            total += sum(p.num_tokens for p in o.paths) + o.num_summary_tokens
        elif isinstance(o, Trace):
            total += o.num_tokens or 0
    return total
