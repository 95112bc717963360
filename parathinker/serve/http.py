"""HTTP concerns, apart from the routes: body limit and read timeout, Content-Type and Host
checks, JSON error answers, SSE framing.

    app.add_middleware(RequestGuard, allowed_hosts=LOOPBACK_HOSTS)   # inner: runs second
    app.add_middleware(BodyLimit, max_bytes=1 << 20, read_timeout=30) # outer: runs first
    install_error_handlers(app)
    uvicorn.Server(uvicorn_config(app, host=..., port=...)).run()    # headers' read timeout too

A stalled client never holds a connection: its request headers must arrive within the read
timeout (`HeaderTimeout`, uvicorn's h11 protocol; uvicorn itself only times out idle keep-alive
connections), else the connection is closed; its body too (`BodyLimit`), else 408 and close.

Why the guard: a web page can make a browser send a "simple" cross-site POST (Content-Type
text/plain or a form type, no CORS preflight) to a keyless server on 127.0.0.1, and DNS
rebinding lets it read the answer under its own host name. Requiring application/json forces a
preflight (which this server never grants) and the Host allow-list stops the rebinding.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from parathinker.serve.fields import APIError

log = logging.getLogger("parathinker.serve")
DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_READ_TIMEOUT_S = 30.0  # for a request's headers, and again for its body
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def dumps(body: Any) -> bytes:
    """JSON with non-ASCII escaped: an error message quoting a lone surrogate still encodes."""
    return json.dumps(body, ensure_ascii=True).encode()


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(body), status, headers, media_type="application/json")


def error_response(e: APIError) -> Response:
    return json_response(e.body(), e.status, e.headers)


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event: `data: {json}` (or `data: [DONE]`) and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def send_error(send: Send, e: APIError, close: bool = False) -> None:
    """Answer from ASGI middleware (before the app has a Request)."""
    payload = dumps(e.body())
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(payload)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in e.headers.items()]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def install_error_handlers(app: FastAPI) -> None:
    """Every error, whoever raises it, answers OpenAI's {"error": {...}} JSON."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> Response:
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> Response:
        return error_response(APIError(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(APIError(500, f"internal server error: {e!r}", "server_error"))


class RequestGuard:
    """ASGI middleware: a Host header outside `allowed_hosts` gets 400 (None allows any host),
    and a POST whose Content-Type is not application/json gets 415."""

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str] | None = LOOPBACK_HOSTS
                 ) -> None:
        self.app = app
        self.allowed = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        host = host_name(headers.get(b"host", b"").decode("latin-1"))
        if self.allowed is not None and host not in self.allowed:
            return await send_error(send, APIError(
                400, f"Host {host!r} is not allowed (parathinker serve --allowed-hosts; default: "
                     "loopback names only, against DNS rebinding)", code="invalid_host"))
        if scope["method"] == "POST":
            media = headers.get(b"content-type", b"").decode("latin-1").split(";")[0]
            if media.strip().lower() != "application/json":
                return await send_error(send, APIError(
                    415, f"Content-Type must be application/json, got {media.strip()!r}",
                    code="unsupported_media_type"))
        await self.app(scope, receive, send)


def host_name(host: str) -> str:
    """'localhost:8000' -> 'localhost', '[::1]:8000' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]")[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class BodyLimit:
    """ASGI middleware: reads the whole body first and answers 413 beyond `max_bytes`, whether
    Content-Length says so up front or a chunked body grows too large, and 408 (closing the
    connection) when the whole body has not arrived `read_timeout` seconds after the headers;
    the app then gets the buffered body and, after it, the real receive (so disconnects are
    still seen).

    Before a 413 the rest of the body (up to `drain_bytes` in all, within the read timeout) is
    read and dropped: a server that answers and closes while the client is still sending resets
    the connection, and the client sees a broken connection instead of the 413."""

    def __init__(self, app: ASGIApp, max_bytes: int, drain_bytes: int | None = None,
                 read_timeout: float = DEFAULT_READ_TIMEOUT_S) -> None:
        self.app, self.max_bytes, self.read_timeout = app, max_bytes, read_timeout
        self.drain_bytes = 16 * max_bytes if drain_bytes is None else drain_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        deadline = asyncio.get_running_loop().time() + self.read_timeout

        async def read() -> dict[str, Any]:
            remaining = deadline - asyncio.get_running_loop().time()
            return await asyncio.wait_for(receive(), max(remaining, 0.0))

        length = dict(scope.get("headers") or []).get(b"content-length")
        try:
            if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
                if length.isdigit() and int(length) <= self.drain_bytes:
                    await self._drain(read, 0)
                return await self._too_large(send)
            chunks, size = [], 0
            while True:
                message = await read()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > self.max_bytes:
                    if message.get("more_body"):
                        await self._drain(read, size)
                    return await self._too_large(send)
                if not message.get("more_body"):
                    break
        except asyncio.TimeoutError:
            log.debug("closing a connection whose request body did not arrive in %g s",
                      self.read_timeout)
            return await send_error(send, APIError(
                408, f"the request body did not arrive within {self.read_timeout:g} s "
                     "(parathinker serve --read-timeout)", code="request_timeout"), close=True)
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
            try:
                message = await receive()
            except asyncio.TimeoutError:
                return  # answer the 413 anyway
            size += len(message.get("body", b""))
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                return

    async def _too_large(self, send: Send) -> None:
        await send_error(send, APIError(413, f"request body larger than {self.max_bytes} bytes "
                                             "(parathinker serve --max-body-bytes)",
                                        code="request_too_large"), close=True)


class HeaderTimeout(H11Protocol):
    """uvicorn's h11 protocol, but a connection whose request headers are not complete
    `header_timeout` seconds after it opened (or after its last response) is closed: uvicorn
    only times out idle keep-alive connections, so half-sent headers would hold one forever."""

    header_timeout = DEFAULT_READ_TIMEOUT_S
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout, self._expired)

    def _expired(self) -> None:
        # their_state IDLE: no request's headers have completed since the timer was armed
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.debug("closing a connection whose request headers did not arrive in %g s",
                      self.header_timeout)
            self.transport.close()


def uvicorn_config(app: FastAPI, **kw: Any) -> uvicorn.Config:
    """uvicorn.Config serving `app` with HeaderTimeout at the app's read timeout
    (create_app(read_timeout=...), also the body's)."""
    timeout = float(app.state.read_timeout)
    protocol = type("HeaderTimeout", (HeaderTimeout,), {"header_timeout": timeout})
    return uvicorn.Config(app, http=protocol, **kw)
