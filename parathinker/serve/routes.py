"""The HTTP routes: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics.

    app.include_router(router)                       # app.state.server: the Server

/v1/* need the API key when the server has one ('Authorization: Bearer <key>', compared in
constant time); /health and /metrics never do (a load balancer and Prometheus poll them). Every
refusal counts in parathinker_requests_total{status="rejected"}.
"""

from __future__ import annotations

import hmac
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from parathinker.serve.admission import Ticket, accept, unknown_model
from parathinker.serve.answers import answer, stream_events
from parathinker.serve.fields import APIError
from parathinker.serve.http import json_response
from parathinker.serve.requests import PARALLEL_FIELDS
from parathinker.serve.server import Server

router = APIRouter()


def _server(request: Request) -> Server:
    return request.app.state.server


def _rejected(server: Server, e: APIError) -> APIError:
    server.metrics.inc("parathinker_requests_total", status="rejected")
    return e


async def check_key(request: Request) -> None:
    server = _server(request)
    if server.api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _rejected(server, APIError(401, "missing API key: send the header "
                                              "'Authorization: Bearer <key>'",
                                         code="invalid_api_key"))
    if not hmac.compare_digest(token.strip().encode(), server.api_key.encode()):
        raise _rejected(server, APIError(401, "incorrect API key", code="invalid_api_key"))


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
            "summary_template_tokens": server.template_len,
            # what `parallel` (and its flat aliases) takes: field -> JSON type; a client can tell
            # whether this server gates (confidence_window, stop_on_agreement, ...)
            "parallel_fields": dict(PARALLEL_FIELDS)}


@router.get("/v1/models", dependencies=[Depends(check_key)])
async def models(request: Request) -> Response:
    return json_response({"object": "list", "data": [_model_card(_server(request))]})


@router.get("/v1/models/{model_id:path}", dependencies=[Depends(check_key)])
async def model(request: Request, model_id: str) -> Response:
    server = _server(request)
    if model_id != server.model_name:
        raise unknown_model(server, model_id)
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
        acc = await accept(server, request, kind)
    except APIError as e:
        raise _rejected(server, e) from None
    ticket = Ticket(server, f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}")
    if acc.parsed.stream:
        events = stream_events(server, ticket, kind, acc)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(ticket.release))
    return await answer(server, request, ticket, kind, acc)
