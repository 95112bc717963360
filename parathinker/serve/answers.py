"""An accepted request's engine Deltas -> its HTTP answer: one JSON response, or an SSE stream.

    response = await answer(server, request, ticket, "chat", acc)           # non-streaming
    events = stream_events(server, ticket, "chat", acc)                     # async iterator of SSE

Both release the ticket when they end, however they end (a client that leaves aborts its request).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from parathinker.serve import choices as C
from parathinker.serve import responses as R
from parathinker.serve.admission import Accepted, Ticket, shutting_down
from parathinker.serve.engine_loop import Delta
from parathinker.serve.fields import APIError
from parathinker.serve.http import json_response, sse
from parathinker.serve.server import Server
from parathinker.serve.stream import StreamText

DISCONNECT_POLL_S = 0.25  # how often a non-streaming handler checks its client is still there


def _delta_error(d: Delta) -> APIError:
    if d.is_shutdown:
        return shutting_down(d.error or "the server is shutting down")
    if d.is_internal:
        return APIError(500, d.error or "internal error", type="server_error")
    if d.status == "aborted":
        return APIError(499, "the request was aborted", code="aborted")
    return APIError(400, d.error or "the request failed")  # failed alone in the engine


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
        return R.chat_choice(index, out, final, parsed.include_reasoning, logprobs, path_logprobs)
    return R.completion_choice(index, out, final, parsed.include_reasoning, logprobs,
                               path_logprobs, echo)


def _usage(server: Server, acc: Accepted, outs: list[Any]) -> dict[str, Any]:
    return R.usage(outs, server.template_len, sum(len(p) for p in acc.prompts))


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
    return json_response(R.response(kind, ticket.request_id, created, server.model_name, choices,
                                    _usage(server, acc, outs)))


async def stream_events(server: Server, ticket: Ticket, kind: str, acc: Accepted
                        ) -> AsyncIterator[str]:
    """SSE events (docs/SERVE.md), the choices' chunks interleaved as they come (each chunk holds
    one choice, `index` saying which); on a client disconnect Starlette cancels this generator
    and `finally` aborts the request at once."""
    rid, created, name, parsed = ticket.request_id, int(time.time()), server.model_name, acc.parsed

    def event(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        return sse(R.chunk(kind, rid, created, name, choices, usage))

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
                yield event([R.stream_choice(kind, index=index, role=True)])
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
            yield event([R.stream_choice(kind, index=index, finish=final.finish_reason,
                                         paths=R.path_list(out, with_text=False,
                                                           with_answer=parsed.include_reasoning))])
        ticket.is_done = True
        if parsed.include_usage:
            yield event([], _usage(server, acc, [outs[i] for i in range(acc.num_choices)]))
        yield sse("[DONE]")
    finally:
        ticket.release()
