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
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from parathinker.config import SamplingParams
from parathinker.llm import LLM
from parathinker.serve import protocol as P
from parathinker.serve.engine_loop import Delta, EngineLoop
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
        self.loop = EngineLoop(llm.engine, self.metrics)
        self.num_in_flight = 0
        self.is_draining = False
        self.created = int(time.time())
        self.template_len = len(llm.summary_template_ids)
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

    def encode(self, kind: str, parsed: P.ParsedRequest) -> list[int]:
        llm = self.llm
        if kind == "completion":
            if parsed.prompt_ids is not None:
                return llm.encode_prompts(None, [parsed.prompt_ids])[0]
            return llm.encode_prompts([parsed.prompt], None, apply_template=False)[0]
        assert parsed.messages is not None
        if self.chat_template == "tokenizer":
            text = llm.tokenizer.apply_chat_template(parsed.messages, tokenize=False,
                                                     add_generation_prompt=True)
            return list(llm.tokenizer.encode(text, add_special_tokens=False))
        text = P.chat_prompt(parsed.messages, llm.format_prompt)
        return llm.encode_prompts([text], None, apply_template=False)[0]

    def num_blocks_worst_case(self, prompt_len: int, params: SamplingParams) -> int:
        """KV blocks the request holds at its largest: the prompt, every path at its budget and
        the summary at its budget."""
        bs = self.llm.engine.block_manager.block_size
        return (-(-prompt_len // bs) + params.num_paths * -(-params.max_path_tokens // bs)
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
    """One accepted request's place in the --max-queued budget. `release` is idempotent: called
    when the handler ends however it ends, it aborts the request if it is still running."""

    def __init__(self, server: Server, request_id: str) -> None:
        self.server, self.request_id = server, request_id
        self.is_submitted = self.is_done = self.is_released = False
        server.num_in_flight += 1
        server.metrics.set("parathinker_requests_in_flight", server.num_in_flight)

    def submit(self, prompt_ids: list[int], params: SamplingParams, stream: bool
               ) -> asyncio.Queue[Delta]:
        queue: asyncio.Queue[Delta] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.server.loop.add(self.request_id, prompt_ids, params,
                             lambda d: loop.call_soon_threadsafe(queue.put_nowait, d), stream)
        self.is_submitted = True
        return queue

    def release(self) -> None:
        if self.is_released:
            return
        self.is_released = True
        if self.is_submitted and not self.is_done:  # the client left: free its blocks now
            self.server.loop.abort(self.request_id)
        self.server.num_in_flight -= 1
        self.server.metrics.set("parathinker_requests_in_flight", self.server.num_in_flight)


def _delta_error(d: Delta) -> P.APIError:
    if d.is_shutdown:
        return P.APIError(503, d.error or "the server is shutting down", type="server_error",
                          code="server_shutting_down", headers={"Retry-After": RETRY_AFTER_S})
    if d.is_internal:
        return P.APIError(500, d.error or "internal error", type="server_error")
    if d.request is not None and d.request.status == "aborted":
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


async def generate(request: Request, kind: str) -> Response:
    server = _server(request)
    try:
        parsed, prompt_ids, params = await accept(server, request, kind)
    except P.APIError as e:
        raise _rejected(server, e) from None
    ticket = Ticket(server, f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}")
    if parsed.stream:
        events = stream_events(server, ticket, kind, parsed, prompt_ids, params)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(ticket.release))
    return await answer(server, request, ticket, kind, parsed, prompt_ids, params)


async def accept(server: Server, request: Request, kind: str
                 ) -> tuple[P.ParsedRequest, list[int], SamplingParams]:
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
    if num_bytes > server.max_prompt_bytes:
        raise P.APIError(400, f"prompt of {num_bytes} bytes is longer than the model's context "
                              f"({limit} positions) could hold at the tokenizer's longest token; "
                              "shorten it", param=parsed.prompt_param)
    try:
        prompt_ids = await server.off_loop(server.encode, kind, parsed,
                                           large=num_bytes > LARGE_PROMPT_BYTES)
        params = P.sampling_params(parsed, server.defaults, len(prompt_ids), limit,
                                   server.template_len,
                                   path_multiple=16 if llm.layout == "reference" else 1)
        llm.validate(prompt_ids, params)
        prompt_ids = llm.engine_prompt(prompt_ids)  # --layout reference: padded as SPEC §6
    except ValueError as e:
        raise P.APIError(400, str(e), param=P.param_of(str(e), parsed)) from None
    bm = llm.engine.block_manager
    need = server.num_blocks_worst_case(len(prompt_ids), params)
    if need > bm.num_blocks:
        raise P.APIError(400, f"the request may need {need} KV blocks of {bm.block_size} tokens "
                              f"(prompt {len(prompt_ids)}, {params.num_paths} x max_path_tokens "
                              f"{params.max_path_tokens}, max_summary_tokens "
                              f"{params.max_summary_tokens}) but the pool has {bm.num_blocks} in "
                              "all; lower the budgets (or raise --num-kv-blocks)",
                         param=parsed.sources.get("max_path_tokens"), code="kv_cache_too_small")
    if server.num_in_flight >= server.max_queued:
        raise P.APIError(429, f"too many requests in flight ({server.num_in_flight}; the limit is "
                              f"--max-queued {server.max_queued}); retry later",
                         type="rate_limit_error", code="rate_limit_exceeded",
                         headers={"Retry-After": RETRY_AFTER_S})
    return parsed, prompt_ids, params


async def answer(server: Server, request: Request, ticket: Ticket, kind: str,
                 parsed: P.ParsedRequest, prompt_ids: list[int], params: SamplingParams
                 ) -> Response:
    """A non-streaming request: wait for its last Delta, watching for the client to leave."""
    created = int(time.time())
    try:
        queue = ticket.submit(prompt_ids, params, stream=False)
        while True:
            try:
                d = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
                break
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return Response(status_code=499)  # nobody is listening; release aborts
        ticket.is_done = True
    finally:
        ticket.release()
    if d.error is not None or d.request is None:
        raise _delta_error(d)
    out = await server.off_loop(server.llm.request_output, d.request)  # decodes every path
    build = P.chat_response if kind == "chat" else P.completion_response
    return json_response(build(ticket.request_id, created, server.model_name, out,
                               server.template_len, parsed.include_reasoning))


async def stream_events(server: Server, ticket: Ticket, kind: str, parsed: P.ParsedRequest,
                        prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[str]:
    """SSE events (docs/SERVE.md); on a client disconnect Starlette cancels this generator and
    `finally` aborts the request at once."""
    rid, created, name = ticket.request_id, int(time.time()), server.model_name

    def event(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        return sse(P.chunk(kind, rid, created, name, choices, usage))

    try:
        queue = ticket.submit(prompt_ids, params, stream=True)
        if kind == "chat":
            yield event([P.stream_choice(kind, role=True)])
        text = StreamText(server.llm.tokenizer, server.llm.ctrl, params.num_paths,
                          parsed.include_reasoning, parsed.include_paths)
        while True:
            d = await queue.get()
            for choice in text.choices(kind, d):
                yield event([choice])
            if d.is_final:
                break
        ticket.is_done = True
        if d.error is not None or d.request is None:
            yield sse(_delta_error(d).body())
        else:
            out = await server.off_loop(server.llm.request_output, d.request)
            yield event([P.stream_choice(kind, finish=P.finish_reason(out.summary.finish_reason),
                                         paths=P.path_list(out, with_text=False))])
            if parsed.include_usage:
                yield event([], P.usage(out, server.template_len))
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
