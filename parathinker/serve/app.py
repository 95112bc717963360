"""The OpenAI-compatible HTTP app: /v1/chat/completions, /v1/completions, /v1/models, /health,
/metrics. One EngineLoop (a background thread) runs every request, so concurrent clients share
each forward.

    app = create_app(llm, "my-model", api_key=None, max_queued=256)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Request shapes and extension fields: protocol.py and docs/SERVE.md. The LLM's engine belongs to
the app while it runs: do not call llm.generate on the same LLM at the same time.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from parathinker.config import SamplingParams
from parathinker.llm import LLM
from parathinker.serve import protocol as P
from parathinker.serve.detokenize import IncrementalDetokenizer
from parathinker.serve.engine_loop import Delta, EngineLoop
from parathinker.serve.metrics import Metrics

log = logging.getLogger("parathinker.serve")
DEFAULT_MAX_BODY_BYTES = 1 << 20
DISCONNECT_POLL_S = 0.25  # how often a non-streaming handler checks its client is still there

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class BodyLimit:
    """ASGI middleware: reads the whole body first and answers 413 beyond `max_bytes`, whether
    Content-Length says so up front or a chunked body grows too large; the app then gets the
    buffered body and, after it, the real receive (so disconnects are still seen).

    Before a 413 the rest of the body (up to `drain_bytes` in all) is read and dropped: a
    server that answers and closes while the client is still sending resets the connection,
    and the client sees a broken connection instead of the 413."""

    def __init__(self, app: Callable[..., Awaitable[None]], max_bytes: int,
                 drain_bytes: int | None = None) -> None:
        self.app, self.max_bytes = app, max_bytes
        self.drain_bytes = 16 * max_bytes if drain_bytes is None else drain_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            if length.isdigit() and int(length) <= self.drain_bytes:
                await self._drain(receive, 0)
            return await self._too_large(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                if message.get("more_body"):
                    await self._drain(receive, size)
                return await self._too_large(send)
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _drain(self, receive: Receive, size: int) -> None:
        while size <= self.drain_bytes:
            message = await receive()
            size += len(message.get("body", b""))
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                return

    async def _too_large(self, send: Send) -> None:
        err = P.APIError(413, f"request body larger than {self.max_bytes} bytes "
                              "(parathinker serve --max-body-bytes)", code="request_too_large")
        payload = json.dumps(err.body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})


class _Server:
    """What the handlers share. Touched only on the event loop's thread (no locks needed)."""

    def __init__(self, llm: LLM, model_name: str, api_key: str | None, max_queued: int,
                 defaults: P.ServeDefaults, chat_template: str) -> None:
        self.llm, self.model_name, self.api_key = llm, model_name, api_key
        self.max_queued, self.defaults, self.chat_template = max_queued, defaults, chat_template
        self.metrics = Metrics(llm.engine.block_manager.num_blocks)
        self.loop = EngineLoop(llm.engine, self.metrics)
        self.num_in_flight = 0
        self.created = int(time.time())
        # one thread for tokenizer work off the event loop: encode/decode calls never overlap
        self.tokenizer_pool = ThreadPoolExecutor(1, thread_name_prefix="parathinker-tokenizer")

    async def off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_pool, fn, *args)

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


class _Ticket:
    """One accepted request's place in the --max-queued budget. `release` is idempotent: called
    when the handler ends however it ends, it aborts the request if it is still running."""

    def __init__(self, server: _Server, request_id: str) -> None:
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


class _StreamText:
    """Turns Deltas into text: one detokenizer per path and one for the summary, dropping the
    tags exactly as LLM.to_output does (so the streamed text equals the non-streamed text)."""

    def __init__(self, llm: LLM, num_paths: int) -> None:
        self.ctrl = llm.ctrl
        self.paths = [IncrementalDetokenizer(llm.tokenizer) for _ in range(num_paths)]
        self.num_seen = [0] * num_paths
        self.summary = IncrementalDetokenizer(llm.tokenizer)
        self.num_summary_seen = 0

    def choices(self, kind: str, d: Delta) -> list[dict[str, Any]]:
        out = []
        for k in sorted(set(d.path_tokens) | set(d.path_finish)):
            ids = d.path_tokens.get(k, [])
            first = self.num_seen[k] == 0
            self.num_seen[k] += len(ids)
            ids = ids[1:] if first else ids  # <think{k}>
            reason = d.path_finish.get(k)
            if reason is not None:
                ids = ids[:-1]  # </think{k}>
            text = self.paths[k].add(ids) + (self.paths[k].flush() if reason else "")
            if text:
                out.append(P.stream_choice(kind, reasoning=text, path_index=k + 1))
            if reason:
                out.append(P.stream_choice(kind, reasoning="", path_index=k + 1,
                                           path_finish=reason))
        ids = d.summary_tokens
        if ids and self.num_summary_seen == 0 and ids[0] == self.ctrl.summary_open:
            ids = ids[1:]
        self.num_summary_seen += len(d.summary_tokens)
        if d.summary_finish == "end":
            ids = ids[:-1]  # </summary> or EOS
        text = self.summary.add(ids) + (self.summary.flush() if d.summary_finish else "")
        if text:
            out.append(P.stream_choice(kind, content=text))
        return out


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def _delta_error(d: Delta) -> P.APIError:
    if d.is_internal:
        return P.APIError(500, d.error or "internal error", type="server_error")
    if d.request is not None and d.request.status == "aborted":
        return P.APIError(499, "the request was aborted", code="aborted")
    return P.APIError(400, d.error or "the request failed")  # e.g. larger than the KV pool


def create_app(llm: LLM, served_model_name: str, api_key: str | None = None,
               max_queued: int = 256, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               defaults: P.ServeDefaults | None = None,
               chat_template: str = "parathinker") -> FastAPI:
    """chat_template: "parathinker" (SPEC §3's prompt template around the last user message; the
    template the checkpoint was trained on) or "tokenizer" (the tokenizer's own chat template)."""
    if chat_template not in ("parathinker", "tokenizer"):
        raise ValueError(f"chat_template must be 'parathinker' or 'tokenizer', "
                         f"got {chat_template!r}")
    if chat_template == "tokenizer" and not getattr(llm.tokenizer, "chat_template", None):
        raise ValueError("chat_template='tokenizer' but the tokenizer has no chat template")
    if max_queued < 1:
        raise ValueError(f"max_queued must be >= 1, got {max_queued}")
    server = _Server(llm, served_model_name, api_key, max_queued,
                     defaults or P.ServeDefaults(), chat_template)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.loop.start()
        try:
            yield
        finally:
            await asyncio.to_thread(server.loop.stop)
            server.tokenizer_pool.shutdown(wait=False)

    app = FastAPI(title="parathinker", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = server
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    @app.exception_handler(P.APIError)
    async def api_error(_: Request, e: P.APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(P.APIError(e.status_code, str(e.detail)).body(),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(P.APIError(500, f"internal server error: {e!r}", "server_error").body(),
                            status_code=500)

    def rejected(e: P.APIError) -> P.APIError:
        server.metrics.inc("parathinker_requests_total", status="rejected")
        return e

    async def check_key(request: Request) -> None:
        if server.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise rejected(P.APIError(401, "missing API key: send the header 'Authorization: "
                                           "Bearer <key>'", code="invalid_api_key"))
        if not hmac.compare_digest(token.strip().encode(), server.api_key.encode()):
            raise rejected(P.APIError(401, "incorrect API key", code="invalid_api_key"))

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = server.loop.is_alive()
        return JSONResponse({"status": "ok" if ok else "engine loop stopped"},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(server.metrics.render(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict[str, Any]:
        return {"id": server.model_name, "object": "model", "created": server.created,
                "owned_by": "parathinker",
                "max_model_len": llm.config.max_position_embeddings, "max_paths": llm.max_paths,
                # what the engine runs with: --rope-scaling resolved from the path budget, --layout
                "rope_scaling": llm.config.rope_scaling, "layout": llm.layout}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(check_key)])
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != server.model_name:
            raise _unknown_model(model_id)
        return model_card()

    def _unknown_model(name: str) -> P.APIError:
        return P.APIError(404, f"the model '{name}' does not exist; this server serves "
                               f"'{server.model_name}'", param="model", code="model_not_found")

    async def accept(request: Request, kind: str
                     ) -> tuple[P.ParsedRequest, list[int], SamplingParams]:
        """Parse and validate a request and check the queue limit; nothing runs yet."""
        raw = await request.body()
        try:
            body = json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError) as e:
            raise P.APIError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise P.APIError(400, "request body must be a JSON object")
        parsed = P.parse_chat(body) if kind == "chat" else P.parse_completion(body)
        if parsed.model is not None and parsed.model != server.model_name:
            raise _unknown_model(parsed.model)
        try:
            prompt_ids = await server.off_loop(server.encode, kind, parsed)
            params = P.sampling_params(parsed, server.defaults, len(prompt_ids),
                                       llm.config.max_position_embeddings)
            llm.validate(prompt_ids, params)
        except ValueError as e:
            raise P.APIError(400, P.with_hint(str(e), parsed)) from None
        if server.num_in_flight >= server.max_queued:
            raise P.APIError(429, f"too many requests in flight ({server.num_in_flight}; the "
                                  f"limit is --max-queued {server.max_queued}); retry later",
                             type="rate_limit_error", code="rate_limit_exceeded")
        return parsed, prompt_ids, params

    async def generate(request: Request, kind: str) -> Response:
        try:
            parsed, prompt_ids, params = await accept(request, kind)
        except P.APIError as e:
            raise rejected(e) from None
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        ticket = _Ticket(server, rid)
        created, model_name = int(time.time()), server.model_name
        if parsed.stream:
            events = _stream(ticket, kind, created, prompt_ids, params)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache",
                                              "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(ticket.release))
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
        out = await server.off_loop(llm.request_output, d.request)  # decodes every path
        build = P.chat_response if kind == "chat" else P.completion_response
        return JSONResponse(build(rid, created, model_name, out))

    async def _stream(ticket: _Ticket, kind: str, created: int, prompt_ids: list[int],
                      params: SamplingParams) -> AsyncIterator[str]:
        """SSE events; on a client disconnect Starlette cancels this generator and `finally`
        aborts the request at once."""
        rid, name = ticket.request_id, server.model_name
        try:
            queue = ticket.submit(prompt_ids, params, stream=True)
            if kind == "chat":
                yield _sse(P.chunk(kind, rid, created, name, [P.stream_choice(kind, role=True)]))
            text = _StreamText(llm, params.num_paths)
            while True:
                d = await queue.get()
                for choice in text.choices(kind, d):
                    yield _sse(P.chunk(kind, rid, created, name, [choice]))
                if not d.is_final:
                    continue
                ticket.is_done = True
                if d.error is not None or d.request is None:
                    yield _sse(_delta_error(d).body())
                else:
                    out = await server.off_loop(llm.request_output, d.request)
                    last = P.stream_choice(kind, finish=P.finish_reason(out.summary.finish_reason),
                                           paths=P.path_list(out, with_text=False))
                    yield _sse(P.chunk(kind, rid, created, name, [last]))
                    yield _sse(P.chunk(kind, rid, created, name, [], P.usage(out)))
                yield _sse("[DONE]")
                return
        finally:
            ticket.release()

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(request: Request) -> Response:
        return await generate(request, "chat")

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(request: Request) -> Response:
        return await generate(request, "completion")

    return app


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a valid JSON number")
