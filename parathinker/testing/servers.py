"""Helpers for the server tests: a live uvicorn server on loopback, the official openai client,
/metrics polling, and rebuilding a streamed answer the way clients do."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import httpx
import openai

from parathinker import LLM, SamplingParams
from parathinker.serve.app import create_app
from parathinker.serve.http import uvicorn_config
from parathinker.serve.metrics import parse

MODEL = "tiny-parathinker"
QUESTION = "What is 2+3?"
SMALL = {"num_paths": 2, "max_path_tokens": 12, "max_summary_tokens": 90}
LONG = {"num_paths": 2, "max_path_tokens": 2000, "min_path_tokens": 2000, "max_summary_tokens": 90}
JSON = {"content-type": "application/json"}
APPS: dict = {}  # base URL -> the app it serves (for tests that reach into the server)


class AppServer:
    """An ASGI app served by uvicorn on 127.0.0.1 in a thread while the `with` block runs (the
    tests' fake OpenAI servers, and `running_server`). `port`: a fixed one, known before the
    server listens (a server that comes up late); None, a free one. `config(app, **kw)` builds
    the uvicorn.Config."""

    def __init__(self, app: Any, port: int | None = None,
                 config: Callable[..., Any] | None = None, **kw: Any) -> None:
        import uvicorn

        self.app, self.port = app, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        kw.setdefault("log_level", "error")
        self.server = uvicorn.Server((config or uvicorn.Config)(app, host="127.0.0.1",
                                                                 port=self.port, **kw))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> AppServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@contextmanager
def running_server(llm: LLM, **kw):
    """create_app(llm, MODEL, **kw) served on 127.0.0.1:<free port> (`AppServer`); yields the
    base URL."""
    kw.setdefault("defaults", SamplingParams(num_paths=2, max_path_tokens=12,
                                             max_summary_tokens=90))
    app = create_app(llm, MODEL, **kw)
    with AppServer(app, config=uvicorn_config, log_level="warning",
                   timeout_graceful_shutdown=2) as server:
        APPS[server.url] = app
        try:
            yield server.url
        finally:
            APPS.pop(server.url, None)


def wait_until_up(proc: subprocess.Popen, url: str, timeout: float = 120) -> None:
    """Until the server process at `url` answers /health (AssertionError if it exits first or
    `timeout` seconds pass)."""
    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.time() < deadline, "server did not start"
        time.sleep(0.2)


def free_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def client(base: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)


def metrics(base: str) -> dict[str, float]:
    return parse(httpx.get(f"{base}/metrics").text)


def wait_for_idle(base: str, timeout: float = 10.0) -> dict[str, float]:
    """Poll /metrics until no KV block is used and nothing is in flight."""
    deadline = time.time() + timeout
    while True:
        m = metrics(base)
        if m["parathinker_kv_cache_blocks_used"] == 0 and m["parathinker_requests_in_flight"] == 0:
            return m
        assert time.time() < deadline, f"server not idle: {m}"
        time.sleep(0.05)


def params(**kw) -> SamplingParams:
    return SamplingParams(**{**SMALL, **kw})


def chat(c: openai.OpenAI, question: str = QUESTION, parallel: dict | None = None, **kw):
    return c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                     extra_body={"parallel": parallel or SMALL}, **kw)


def collect_stream(stream) -> dict:
    """Rebuild a chat stream as clients do: `chunk.choices[0].delta` on every chunk (the generic
    loop; a chunk without choices raises IndexError, as in client code), the readable reasoning
    concatenated (LiteLLM), per-path deltas by path_index (the include_paths extension)."""
    out = {"paths": {}, "path_finish": {}, "content": "", "reasoning": "", "reasoning_alt": "",
           "events": [], "usage": None, "finish": None, "role": None, "num_chunks": 0}
    for ch in stream:
        out["num_chunks"] += 1
        if ch.usage is not None:
            out["usage"] = ch.usage
            if not ch.choices:  # the include_usage chunk: only when asked for
                continue
        choice = ch.choices[0]
        delta = choice.delta
        extra = delta.model_extra or {}
        out["role"] = out["role"] or delta.role
        if extra.get("reasoning_content"):
            out["reasoning"] += extra["reasoning_content"]
            out["events"].append(("reasoning", None))
        out["reasoning_alt"] += extra.get("reasoning") or ""
        if extra.get("path_content"):
            k = extra["path_index"]
            out["paths"][k] = out["paths"].get(k, "") + extra["path_content"]
            out["events"].append(("path", k))
        if extra.get("path_finish_reason"):
            out["path_finish"][extra["path_index"]] = extra["path_finish_reason"]
        if delta.content:
            out["content"] += delta.content
            out["events"].append(("summary", None))
        if choice.finish_reason:
            out["finish"] = choice.finish_reason
    return out
