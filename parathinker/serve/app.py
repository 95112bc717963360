"""The OpenAI-compatible server: `create_app` wires a Server (server.py) to the routes
(routes.py) and the HTTP guards (http.py). One EngineLoop (a background thread) runs every
request, so concurrent clients share each forward.

    app = create_app(llm, "my-model", api_key=None, max_queued=256)
    uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=8000)).run()  # http.py
    await app.state.server.drain(timeout=30)     # graceful shutdown (the CLI does it on SIGTERM)

Where each concern lives: request shapes and extension fields, requests.py and docs/SERVE.md;
typed fields and APIError, fields.py; SamplingParams and budget fitting, params.py; admission
(limits, KV arithmetic, tickets), admission.py; answers and streams, answers.py; response bodies,
responses.py; HTTP concerns (body limit, Content-Type, Host, errors, SSE framing), http.py. The
LLM's engine belongs to the app while it runs: do not call llm.generate on the same LLM at the
same time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from parathinker.config import SamplingParams
from parathinker.llm import LLM
from parathinker.serve.http import (DEFAULT_MAX_BODY_BYTES, DEFAULT_READ_TIMEOUT_S,
                                    LOOPBACK_HOSTS, BodyLimit, RequestGuard,
                                    install_error_handlers)
from parathinker.serve.routes import router
from parathinker.serve.server import Server


def create_app(llm: LLM, served_model_name: str, api_key: str | None = None,
               max_queued: int = 256, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               defaults: SamplingParams | None = None, chat_template: str = "parathinker",
               allowed_hosts: Iterable[str] | None = LOOPBACK_HOSTS,
               read_timeout: float = DEFAULT_READ_TIMEOUT_S) -> FastAPI:
    """chat_template: "parathinker" (SPEC §3's prompt template around the last user message; the
    template the checkpoint was trained on) or "tokenizer" (the tokenizer's own chat template).
    allowed_hosts: the Host header names accepted (None: any, e.g. behind a proxy that checks).
    read_timeout: seconds a request's body may take to arrive (408 after); serve the app with
    http.uvicorn_config so its headers get them too."""
    if chat_template not in ("parathinker", "tokenizer"):
        raise ValueError(f"chat_template must be 'parathinker' or 'tokenizer', "
                         f"got {chat_template!r}")
    if chat_template == "tokenizer" and not getattr(llm.tokenizer, "chat_template", None):
        raise ValueError("chat_template='tokenizer' but the tokenizer has no chat template")
    if not read_timeout > 0:
        raise ValueError(f"read_timeout must be > 0 seconds, got {read_timeout}")
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
    app.state.server, app.state.read_timeout = server, read_timeout
    app.include_router(router)
    install_error_handlers(app)
    app.add_middleware(RequestGuard, allowed_hosts=allowed_hosts)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes,  # added last: runs first
                       read_timeout=read_timeout)
    return app
