"""Admission: what a request must pass before anything runs, and its place while it runs.

    acc = await accept(server, request, "chat")      # APIError: parse, fit, validate, KV, queue
    ticket = Ticket(server, "chatcmpl-…")            # counts against --max-queued
    queue = ticket.submit(acc.prompts, acc.params, acc.job, stream=True)
    ticket.release()                                 # always (idempotent): aborts what still runs

A request is refused, in this order: while the server drains (503); a body that does not parse
(400); another model's name (404); a prompt of more bytes than the context could hold
(400, untokenized); budgets the context or the KV pool can never hold (400, spec/budgets via
params.py and llm.validate; `num_blocks_worst_case`); more requests in flight than --max-queued
(429). Nothing is queued for a refused request.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from fastapi import Request

from parathinker.config import SamplingParams
from parathinker.serve.engine_loop import Delta, Job
from parathinker.serve.fields import APIError, parse_json
from parathinker.serve.params import param_of, sampling_params
from parathinker.serve.requests import ParsedRequest, parse_chat, parse_completion
from parathinker.serve.server import Server

LARGE_PROMPT_BYTES = 64 << 10  # larger prompts tokenize in their own thread (small ones never wait)
RETRY_AFTER_S = "1"


def shutting_down(message: str) -> APIError:
    return APIError(503, message, type="server_error", code="server_shutting_down",
                    headers={"Retry-After": RETRY_AFTER_S})


def unknown_model(server: Server, name: str) -> APIError:
    return APIError(404, f"the model '{name}' does not exist; this server serves "
                         f"'{server.model_name}'", param="model", code="model_not_found")


@dataclass
class Accepted:
    """A validated request: its prompts as the engine runs them, one SamplingParams each."""

    parsed: ParsedRequest
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


async def accept(server: Server, request: Request, kind: str) -> Accepted:
    """Parse and validate a request and check the admission limits; nothing runs yet."""
    if server.is_draining:
        raise shutting_down("the server is shutting down; retry on another replica")
    body = parse_json(await request.body())
    parsed = parse_chat(body) if kind == "chat" else parse_completion(body)
    if parsed.model is not None and parsed.model != server.model_name:
        raise unknown_model(server, parsed.model)
    llm, limit = server.llm, server.llm.config.max_position_embeddings
    num_bytes = parsed.num_text_bytes
    if num_bytes > server.max_prompt_bytes * max(1, len(parsed.prompts)):
        raise APIError(400, f"prompt of {num_bytes} bytes is longer than the model's context "
                            f"({limit} positions) could hold at the tokenizer's longest token; "
                            "shorten it", param=parsed.prompt_param)
    acc = Accepted(parsed, [], [], [])
    has_bos = llm.tokenizer.bos_token_id is not None
    try:
        encoded = await server.off_loop(server.encode_all, kind, parsed,
                                        large=num_bytes > LARGE_PROMPT_BYTES)
        for i, ids in enumerate(encoded):
            where = f" (prompt[{i}])" if len(encoded) > 1 else ""
            try:
                params = sampling_params(parsed, server.defaults, len(ids), limit,
                                         server.template_len, llm.layout, has_bos)
                llm.validate(ids, params)
            except ValueError as e:
                raise ValueError(f"{e}{where}") from None
            except APIError as e:
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
        raise APIError(400, str(e), param=param_of(str(e), parsed)) from None
    if server.num_in_flight >= server.max_queued:
        raise APIError(429, f"too many requests in flight ({server.num_in_flight}; the limit is "
                            f"--max-queued {server.max_queued}); retry later",
                       type="rate_limit_error", code="rate_limit_exceeded",
                       headers={"Retry-After": RETRY_AFTER_S})
    return acc


def num_blocks_worst_case(block_size: int, prompt_len: int, params: SamplingParams,
                          n: int = 1) -> int:
    """KV blocks a request holds at its largest: the prompt (once), and for each of its n samples
    every path at its budget and the summary at its budget."""
    bs = block_size
    return -(-prompt_len // bs) + n * (params.num_paths * -(-params.max_path_tokens // bs)
                                       + -(-params.max_summary_tokens // bs))


def _check_blocks(server: Server, parsed: ParsedRequest, prompt_ids: list[int],
                  params: SamplingParams, where: str) -> None:
    engine = server.llm.engine
    need = num_blocks_worst_case(engine.block_size, len(prompt_ids), params, parsed.n)
    if need > engine.num_kv_blocks:
        samples = f"{parsed.n} samples x " if parsed.n > 1 else ""
        raise APIError(400, f"the request may need {need} KV blocks of {engine.block_size} tokens "
                            f"(prompt {len(prompt_ids)}, {samples}{params.num_paths} x "
                            f"max_path_tokens {params.max_path_tokens}, max_summary_tokens "
                            f"{params.max_summary_tokens}) but the pool has {engine.num_kv_blocks} in "
                            f"all; lower the budgets or n (or raise --num-kv-blocks){where}",
                       param=parsed.sources.get("max_path_tokens"), code="kv_cache_too_small")


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
