"""The OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models, /health,
/metrics. One EngineLoop (a background thread) runs every request, so concurrent clients share
each forward.

    app = create_app(llm, "my-model", api_key=None, max_queued=256)
    uvicorn.run(app, host="127.0.0.1", port=8000)
    await app.state.server.drain(timeout=30)     # graceful shutdown (the CLI does it on SIGTERM)

Request shapes and extension fields: protocol.py and docs/SERVE.md; HTTP concerns (body limit,
Content-Type, Host, errors, SSE framing): http.py. The LLM's engine belongs to the app while it
runs: do not call llm.generate on the same LLM at the same time.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from parathinker.config import SamplingParams
from parathinker.llm import LLM
from parathinker.serve import choices as C
from parathinker.serve import protocol as P
from parathinker.serve.engine_loop import Delta, EngineLoop, Job
from parathinker.serve.http import (DEFAULT_MAX_BODY_BYTES, LOOPBACK_HOSTS, BodyLimit,
                                    RequestGuard, install_error_handlers, json_response, sse)
from parathinker.serve.metrics import Metrics
from parathinker.serve.stream import StreamText

log = logging.getLogger("parathinker.serve")
DISCONNECT_POLL_S = 0.25  # how often a non-streaming handler checks its client is still there
LARGE_PROMPT_BYTES = 64 << 10  # larger prompts tokenize in their own thread (small ones never wait)
RETRY_AFTER_S = "1"


class Server:
    """What the handlers share. Touched only on the event loop's thread (no locks needed)."""

    def __init__(self, llm: LLM, model_name: str, api_key: str | None, max_queued: int,
                 defaults: SamplingParams, chat_template: str) -> None:
        self.llm, self.model_name, self.api_key = llm, model_name, api_key
        self.max_queued, self.defaults, self.chat_template = max_queued, defaults, chat_template
        self.metrics = Metrics(llm.engine.block_manager.num_blocks)
        self.template_len = len(llm.summary_template_ids)
        # what the summary text starts with: the template after <summary> (never stop-checked)
        self.template_text = llm.tokenizer.decode(llm.summary_template_ids[1:],
                                                  skip_special_tokens=False)
        self.loop = EngineLoop(llm.engine, self.metrics, llm.tokenizer, self.template_len)
        self.num_in_flight = 0
        self.is_draining = False
        self.created = int(time.time())
        # a prompt of more bytes than context * (longest token) cannot fit: refused untokenized
        self.max_prompt_bytes = llm.config.max_position_embeddings * _max_token_bytes(llm.tokenizer)
        # tokenizer work off the event loop (the Rust tokenizer releases the GIL), small and
        # large prompts in separate threads so that a small request never queues behind a
        # megabyte one; encode with fixed settings does not mutate the tokenizer
        self.small_pool = ThreadPoolExecutor(1, thread_name_prefix="parathinker-tokenize")
        self.large_pool = ThreadPoolExecutor(1, thread_name_prefix="parathinker-tokenize-large")

    async def off_loop(self, fn: Callable[..., Any], *args: Any, large: bool = False) -> Any:
        pool = self.large_pool if large else self.small_pool
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    def encode_all(self, kind: str, parsed: P.ParsedRequest) -> list[list[int]]:
        """Every prompt of the request (chat: one), as token ids; ValueError names the prompt."""
        if kind == "chat":
            return [self.encode(kind, parsed)]
        out = []
        for i, prompt in enumerate(parsed.prompts):
            try:
                out.append(self.encode_prompt(prompt))
            except ValueError as e:
                raise ValueError(f"{e} (prompt[{i}])" if len(parsed.prompts) > 1 else str(e))
        return out

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            return self.llm.encode_prompts(None, [prompt])[0]
        return self.llm.encode_prompts([prompt], None, apply_template=False)[0]

    def encode(self, kind: str, parsed: P.ParsedRequest) -> list[int]:
        llm = self.llm
        if kind == "completion":
            return self.encode_prompt(parsed.prompts[0])
        assert parsed.messages is not None
        if self.chat_template == "tokenizer":
            text = llm.tokenizer.apply_chat_template(parsed.messages, tokenize=False,
                                                     add_generation_prompt=True)
            return list(llm.tokenizer.encode(text, add_special_tokens=False))
        text = P.chat_prompt(parsed.messages, llm.format_prompt)
        return llm.encode_prompts([text], None, apply_template=False)[0]

    def num_blocks_worst_case(self, prompt_len: int, params: SamplingParams, n: int = 1) -> int:
        """KV blocks the request holds at its largest: the prompt (once), and for each of its n
        samples every path at its budget and the summary at its budget."""
        bs = self.llm.engine.block_manager.block_size
        return -(-prompt_len // bs) + n * (params.num_paths * -(-params.max_path_tokens // bs)
                                           + -(-params.max_summary_tokens // bs))

    async def drain(self, timeout: float) -> None:
        """Graceful shutdown: new requests get 503 at once; those in flight have `timeout`
        seconds to finish, then the rest end (a stream with an error event and [DONE], a
        non-streaming request with a 503)."""
        self.is_draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.num_in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.num_in_flight:
            log.warning("shutdown: ending %d request(s) still in flight after %.0f s",
                        self.num_in_flight, timeout)
            self.loop.fail_all(f"the server is shutting down (requests in flight were given "
                               f"{timeout:g} s to finish)")
            deadline = loop.time() + 5
            while self.num_in_flight and loop.time() < deadline:  # handlers send their answers
                await asyncio.sleep(0.05)

    def close(self) -> None:
        self.loop.stop()
        self.small_pool.shutdown(wait=False)
        self.large_pool.shutdown(wait=False)


def _max_token_bytes(tokenizer: Any) -> int:
    """An upper bound on the text bytes one token covers: the longest token string in UTF-8
    (a byte-level or SentencePiece token string is never shorter than the text it matches)."""
    return max(len(t.encode("utf-8")) for t in tokenizer.get_vocab())


class Ticket:
    """One accepted HTTP request's place in the --max-queued budget, and its engine requests
    (one per prompt). `release` is idempotent: called when the handler ends however it ends,
    it aborts whatever is still running."""

    def __init__(self, server: Server, request_id: str) -> None:
        self.server, self.request_id = server, request_id
        self.engine_ids: list[str] = []
        self.is_done = self.is_released = False
        server.num_in_flight += 1
        server.metrics.set("parathinker_requests_in_flight", server.num_in_flight)

    def submit(self, prompts: list[list[int]], params: list[SamplingParams], job: Job,
               stream: bool) -> asyncio.Queue[tuple[int, Delta]]:
        """-> a queue of (prompt index, Delta): n final Deltas per prompt."""
        queue: asyncio.Queue[tuple[int, Delta]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        for i, (ids, p) in enumerate(zip(prompts, params)):
            rid = self.request_id if len(prompts) == 1 else f"{self.request_id}-{i}"
            self.engine_ids.append(rid)
            self.server.loop.add(rid, ids, p, lambda d, i=i: loop.call_soon_threadsafe(
                queue.put_nowait, (i, d)), stream, job)
        return queue

    def release(self) -> None:
        if self.is_released:
            return
        self.is_released = True
        if not self.is_done:  # the client left or a choice failed: free the blocks now
            for rid in self.engine_ids:
                self.server.loop.abort(rid)
        self.server.num_in_flight -= 1
        self.server.metrics.set("parathinker_requests_in_flight", self.server.num_in_flight)


def _delta_error(d: Delta) -> P.APIError:
    if d.is_shutdown:
        return P.APIError(503, d.error or "the server is shutting down", type="server_error",
                          code="server_shutting_down", headers={"Retry-After": RETRY_AFTER_S})
    if d.is_internal:
        return P.APIError(500, d.error or "internal error", type="server_error")
    if d.status == "aborted":
        return P.APIError(499, "the request was aborted", code="aborted")
    return P.APIError(400, d.error or "the request failed")  # failed alone in the engine


# ----- routes
router = APIRouter()


def _server(request: Request) -> Server:
    return request.app.state.server


def _rejected(server: Server, e: P.APIError) -> P.APIError:
    server.metrics.inc("parathinker_requests_total", status="rejected")
    return e


async def check_key(request: Request) -> None:
    server = _server(request)
    if server.api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _rejected(server, P.APIError(401, "missing API key: send the header "
                                                "'Authorization: Bearer <key>'",
                                           code="invalid_api_key"))
    if not hmac.compare_digest(token.strip().encode(), server.api_key.encode()):
        raise _rejected(server, P.APIError(401, "incorrect API key", code="invalid_api_key"))


@router.get("/health")
async def health(request: Request) -> Response:
    server = _server(request)
    status = ("shutting down" if server.is_draining else
              "ok" if server.loop.is_alive() else "engine loop stopped")
    return json_response({"status": status}, 200 if status == "ok" else 503)


@router.get("/metrics")
async def metrics(request: Request) -> PlainTextResponse:
    return PlainTextResponse(_server(request).metrics.render(),
                             media_type="text/plain; version=0.0.4; charset=utf-8")


def _model_card(server: Server) -> dict[str, Any]:
    llm = server.llm
    return {"id": server.model_name, "object": "model", "created": server.created,
            "owned_by": "parathinker", "max_model_len": llm.config.max_position_embeddings,
            "max_paths": llm.max_paths,
            # what the engine runs with: --rope-scaling resolved from the path budget, --layout
            "rope_scaling": llm.config.rope_scaling, "layout": llm.layout,
            # T: clients that count the summary with its forced template (eval) add it to usage
            "summary_template_tokens": server.template_len}


def _unknown_model(server: Server, name: str) -> P.APIError:
    return P.APIError(404, f"the model '{name}' does not exist; this server serves "
                           f"'{server.model_name}'", param="model", code="model_not_found")


@router.get("/v1/models", dependencies=[Depends(check_key)])
async def models(request: Request) -> Response:
    return json_response({"object": "list", "data": [_model_card(_server(request))]})


@router.get("/v1/models/{model_id:path}", dependencies=[Depends(check_key)])
async def model(request: Request, model_id: str) -> Response:
    server = _server(request)
    if model_id != server.model_name:
        raise _unknown_model(server, model_id)
    return json_response(_model_card(server))


@router.post("/v1/chat/completions", dependencies=[Depends(check_key)])
async def chat_completions(request: Request) -> Response:
    return await generate(request, "chat")


@router.post("/v1/completions", dependencies=[Depends(check_key)])
async def completions(request: Request) -> Response:
    return await generate(request, "completion")


@dataclass
class Accepted:
    """A validated request: its prompts as the engine runs them, one SamplingParams each."""

    parsed: P.ParsedRequest
    prompts: list[list[int]]
    params: list[SamplingParams]
    echo: list[str]  # per prompt: the text `echo` puts before its choices' text

    @property
    def job(self) -> Job:
        p = self.parsed
        return Job(p.n, p.logprobs, p.path_logprobs, p.stop)

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.parsed.n


async def generate(request: Request, kind: str) -> Response:
    server = _server(request)
    try:
        acc = await accept(server, request, kind)
    except P.APIError as e:
        raise _rejected(server, e) from None
    ticket = Ticket(server, f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}")
    if acc.parsed.stream:
        events = stream_events(server, ticket, kind, acc)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(ticket.release))
    return await answer(server, request, ticket, kind, acc)


async def accept(server: Server, request: Request, kind: str) -> Accepted:
    """Parse and validate a request and check the admission limits; nothing runs yet."""
    if server.is_draining:
        raise P.APIError(503, "the server is shutting down; retry on another replica",
                         type="server_error", code="server_shutting_down",
                         headers={"Retry-After": RETRY_AFTER_S})
    body = P.parse_json(await request.body())
    parsed = P.parse_chat(body) if kind == "chat" else P.parse_completion(body)
    if parsed.model is not None and parsed.model != server.model_name:
        raise _unknown_model(server, parsed.model)
    llm, limit = server.llm, server.llm.config.max_position_embeddings
    num_bytes = parsed.num_text_bytes
    if num_bytes > server.max_prompt_bytes * max(1, len(parsed.prompts)):
        raise P.APIError(400, f"prompt of {num_bytes} bytes is longer than the model's context "
                              f"({limit} positions) could hold at the tokenizer's longest token; "
                              "shorten it", param=parsed.prompt_param)
    acc = Accepted(parsed, [], [], [])
    try:
        encoded = await server.off_loop(server.encode_all, kind, parsed,
                                        large=num_bytes > LARGE_PROMPT_BYTES)
        for i, ids in enumerate(encoded):
            where = f" (prompt[{i}])" if len(encoded) > 1 else ""
            try:
                params = P.sampling_params(parsed, server.defaults, len(ids), limit,
                                           server.template_len,
                                           path_multiple=16 if llm.layout == "reference" else 1)
                llm.validate(ids, params)
            except ValueError as e:
                raise ValueError(f"{e}{where}") from None
            except P.APIError as e:
                e.message += where
                raise
            acc.prompts.append(llm.engine_prompt(ids))  # --layout reference: padded, SPEC §6
            acc.params.append(params)
            if parsed.echo:
                prompt = parsed.prompts[i]
                acc.echo.append(prompt if isinstance(prompt, str) else
                                llm.tokenizer.decode(prompt, skip_special_tokens=False))
            else:
                acc.echo.append("")
            _check_blocks(server, parsed, acc.prompts[-1], params, where)
    except ValueError as e:
        raise P.APIError(400, str(e), param=P.param_of(str(e), parsed)) from None
    if server.num_in_flight >= server.max_queued:
        raise P.APIError(429, f"too many requests in flight ({server.num_in_flight}; the limit is "
                              f"--max-queued {server.max_queued}); retry later",
                         type="rate_limit_error", code="rate_limit_exceeded",
                         headers={"Retry-After": RETRY_AFTER_S})
    return acc


def _check_blocks(server: Server, parsed: P.ParsedRequest, prompt_ids: list[int],
                  params: SamplingParams, where: str) -> None:
    bm = server.llm.engine.block_manager
    need = server.num_blocks_worst_case(len(prompt_ids), params, parsed.n)
    if need > bm.num_blocks:
        samples = f"{parsed.n} samples x " if parsed.n > 1 else ""
        raise P.APIError(400, f"the request may need {need} KV blocks of {bm.block_size} tokens "
                              f"(prompt {len(prompt_ids)}, {samples}{params.num_paths} x "
                              f"max_path_tokens {params.max_path_tokens}, max_summary_tokens "
                              f"{params.max_summary_tokens}) but the pool has {bm.num_blocks} in "
                              f"all; lower the budgets or n (or raise --num-kv-blocks){where}",
                         param=parsed.sources.get("max_path_tokens"), code="kv_cache_too_small")


def _choice(server: Server, kind: str, acc: Accepted, index: int, out: Any) -> dict[str, Any]:
    """One finished choice: stop strings, echo, logprobs (paths' too when asked)."""
    parsed, tokenizer = acc.parsed, server.llm.tokenizer
    final = C.finish(out, parsed.stop, server.template_text)
    echo = acc.echo[index // parsed.n]
    logprobs = path_logprobs = None
    if parsed.logprobs is not None:
        logprobs = C.summary_logprobs(tokenizer, out, final, parsed.logprobs, kind, len(echo))
        if parsed.path_logprobs:
            path_logprobs = C.path_logprobs(tokenizer, out, server.llm.ctrl.think_close,
                                            parsed.logprobs)
    if kind == "chat":
        return P.chat_choice(index, out, final, parsed.include_reasoning, logprobs, path_logprobs)
    return P.completion_choice(index, out, final, parsed.include_reasoning, logprobs,
                               path_logprobs, echo)


def _usage(server: Server, acc: Accepted, outs: list[Any]) -> dict[str, Any]:
    return P.usage(outs, server.template_len, sum(len(p) for p in acc.prompts))


async def answer(server: Server, request: Request, ticket: Ticket, kind: str, acc: Accepted
                 ) -> Response:
    """A non-streaming request: wait for the last Delta of every choice, watching for the client
    to leave; the first choice that fails fails the request (release aborts the others)."""
    created = int(time.time())
    finals: dict[int, Delta] = {}
    try:
        queue = ticket.submit(acc.prompts, acc.params, acc.job, stream=False)
        while len(finals) < acc.num_choices:
            try:
                i, d = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return Response(status_code=499)  # nobody is listening; release aborts
                continue
            if d.error is not None or d.request is None:
                raise _delta_error(d)
            finals[i * acc.parsed.n + d.index] = d
        ticket.is_done = True
    finally:
        ticket.release()

    def build() -> tuple[list[dict[str, Any]], list[Any]]:
        outs = [server.llm.request_output(finals[i].request) for i in range(acc.num_choices)]
        return [_choice(server, kind, acc, i, o) for i, o in enumerate(outs)], outs

    choices, outs = await server.off_loop(build)  # decodes every path
    return json_response(P.response(kind, ticket.request_id, created, server.model_name, choices,
                                    _usage(server, acc, outs)))


async def stream_events(server: Server, ticket: Ticket, kind: str, acc: Accepted
                        ) -> AsyncIterator[str]:
    """SSE events (docs/SERVE.md), the choices' chunks interleaved as they come (each chunk holds
    one choice, `index` saying which); on a client disconnect Starlette cancels this generator
    and `finally` aborts the request at once."""
    rid, created, name, parsed = ticket.request_id, int(time.time()), server.model_name, acc.parsed

    def event(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        return sse(P.chunk(kind, rid, created, name, choices, usage))

    try:
        queue = ticket.submit(acc.prompts, acc.params, acc.job, stream=True)
        texts = []
        for index in range(acc.num_choices):
            params = acc.params[index // parsed.n]
            texts.append(StreamText(server.llm.tokenizer, server.llm.ctrl, params.num_paths,
                                    parsed.include_reasoning, parsed.include_paths, index=index,
                                    stop=parsed.stop, template_text=server.template_text,
                                    echo=acc.echo[index // parsed.n]))
            if kind == "chat":
                yield event([P.stream_choice(kind, index=index, role=True)])
        outs: dict[int, Any] = {}
        while len(outs) < acc.num_choices:
            i, d = await queue.get()
            index = i * parsed.n + d.index
            for choice in texts[index].choices(kind, d):
                yield event([choice])
            if not d.is_final:
                continue
            if d.error is not None or d.request is None:
                yield sse(_delta_error(d).body())
                yield sse("[DONE]")
                return
            out = outs[index] = await server.off_loop(server.llm.request_output, d.request)
            final = C.finish(out, parsed.stop, server.template_text)
            yield event([P.stream_choice(kind, index=index, finish=final.finish_reason,
                                         paths=P.path_list(out, with_text=False))])
        ticket.is_done = True
        if parsed.include_usage:
            yield event([], _usage(server, acc, [outs[i] for i in range(acc.num_choices)]))
        yield sse("[DONE]")
    finally:
        ticket.release()


def create_app(llm: LLM, served_model_name: str, api_key: str | None = None,
               max_queued: int = 256, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               defaults: SamplingParams | None = None, chat_template: str = "parathinker",
               allowed_hosts: Iterable[str] | None = LOOPBACK_HOSTS) -> FastAPI:
    """chat_template: "parathinker" (SPEC §3's prompt template around the last user message; the
    template the checkpoint was trained on) or "tokenizer" (the tokenizer's own chat template).
    allowed_hosts: the Host header names accepted (None: any, e.g. behind a proxy that checks)."""
    if chat_template not in ("parathinker", "tokenizer"):
        raise ValueError(f"chat_template must be 'parathinker' or 'tokenizer', "
                         f"got {chat_template!r}")
    if chat_template == "tokenizer" and not getattr(llm.tokenizer, "chat_template", None):
        raise ValueError("chat_template='tokenizer' but the tokenizer has no chat template")
    if max_queued < 1:
        raise ValueError(f"max_queued must be >= 1, got {max_queued}")
    server = Server(llm, served_model_name, api_key, max_queued, defaults or SamplingParams(),
                    chat_template)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.loop.start()
        try:
            yield
        finally:
            await asyncio.to_thread(server.close)

    app = FastAPI(title="parathinker", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = server
    app.include_router(router)
    install_error_handlers(app)
    app.add_middleware(RequestGuard, allowed_hosts=allowed_hosts)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)  # added last: runs first
    return app
