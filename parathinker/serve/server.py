"""`Server`: what the request handlers share (the LLM, the engine loop, metrics, the limits, the
tokenizer threads), and turning a parsed request's prompts into token ids.

    server = Server(llm, "my-model", api_key=None, max_queued=256, defaults=SamplingParams(),
                    chat_template="parathinker")
    ids = await server.off_loop(server.encode_all, "chat", parsed)
    await server.drain(timeout=30)                   # graceful shutdown

The LLM's engine belongs to the server while it runs: do not call llm.generate on the same LLM at
the same time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from parathinker.config import SamplingParams
from parathinker.llm import LLM
from parathinker.serve.engine_loop import EngineLoop
from parathinker.serve.metrics import Metrics
from parathinker.serve.requests import ParsedRequest, chat_prompt

log = logging.getLogger("parathinker.serve")


class Server:
    """What the handlers share. Touched only on the event loop's thread (no locks needed)."""

    def __init__(self, llm: LLM, model_name: str, api_key: str | None, max_queued: int,
                 defaults: SamplingParams, chat_template: str) -> None:
        self.llm, self.model_name, self.api_key = llm, model_name, api_key
        self.max_queued, self.defaults, self.chat_template = max_queued, defaults, chat_template
        self.metrics = Metrics(llm.engine.num_kv_blocks)
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

    def encode_all(self, kind: str, parsed: ParsedRequest) -> list[list[int]]:
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

    def encode(self, kind: str, parsed: ParsedRequest) -> list[int]:
        llm = self.llm
        if kind == "completion":
            return self.encode_prompt(parsed.prompts[0])
        assert parsed.messages is not None
        if self.chat_template == "tokenizer":
            text = llm.tokenizer.apply_chat_template(parsed.messages, tokenize=False,
                                                     add_generation_prompt=True)
            return list(llm.tokenizer.encode(text, add_special_tokens=False))
        text = chat_prompt(parsed.messages, llm.format_prompt)
        return llm.encode_prompts([text], None, apply_template=False)[0]

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
