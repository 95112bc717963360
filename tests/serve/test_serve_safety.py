"""A server safe on loopback and under pressure (issue 13), live: application/json only (a
browser's "simple" cross-site POST is refused), a Host allow-list against DNS rebinding,
tokenization that neither runs unbounded nor makes small requests wait, and a graceful drain
on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from parathinker import SamplingParams
from parathinker.testing.servers import APPS, JSON, MODEL, QUESTION, SMALL, chat, client, free_port, metrics, wait_until_up
from parathinker.serve.admission import LARGE_PROMPT_BYTES
from parathinker.serve.app import create_app

pytest.importorskip("uvicorn")
BODY = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": QUESTION}],
                   "parallel": SMALL})


NUM_KV_BLOCKS = 512


# ----- Content-Type and Host
@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "text/json"])
def test_only_json_bodies_run(served, content_type):
    """What a web page can make a browser send cross-site without a preflight never runs."""
    base, _ = served
    before = metrics(base)
    headers = {} if content_type is None else {"content-type": content_type}
    for path in ("chat/completions", "completions"):
        r = httpx.post(f"{base}/v1/{path}", content=BODY, headers=headers)
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    after = metrics(base)
    assert after["parathinker_engine_steps_total"] == before["parathinker_engine_steps_total"]
    assert after["parathinker_tokens_total{kind=\"prompt\"}"] == \
        before["parathinker_tokens_total{kind=\"prompt\"}"]


def test_json_with_charset_runs(served):
    r = httpx.post(f"{served[0]}/v1/chat/completions", content=BODY, timeout=30,
                   headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example",
                                  ""])
def test_foreign_host_header_is_refused(served, host):
    """DNS rebinding: the page's own name resolves to 127.0.0.1, so the Host header is its."""
    base, _ = served
    headers = {**JSON, "host": host}
    for r in (httpx.post(f"{base}/v1/chat/completions", content=BODY, headers=headers),
              httpx.get(f"{base}/v1/models", headers=headers),
              httpx.get(f"{base}/metrics", headers=headers)):
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", r.text


def test_loopback_names_are_allowed(served):
    base, _ = served
    port = base.rsplit(":", 1)[1]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST"):
        r = httpx.get(f"{base}/v1/models", headers={"host": host})
        assert r.status_code == 200, (host, r.text)


def test_allowed_hosts_is_configurable(server_llm_factory):
    llm = server_llm_factory

    async def status(app, host: str) -> int:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=f"http://{host}") as c:
            return (await c.get("/v1/models")).status_code

    proxy = create_app(llm, MODEL, allowed_hosts=["api.example.com"])
    assert asyncio.run(status(proxy, "api.example.com")) == 200
    assert asyncio.run(status(proxy, "localhost")) == 400
    anything = create_app(llm, MODEL, allowed_hosts=None)
    assert asyncio.run(status(anything, "whatever.example")) == 200

    from parathinker.serve.cli import add_serve_args, allowed_hosts

    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    hosts = lambda *a: allowed_hosts(parser.parse_args(["--model", "m", *a]))  # noqa: E731
    assert hosts() == ["localhost", "127.0.0.1", "::1"]
    assert hosts("--host", "10.0.0.5") == ["localhost", "127.0.0.1", "::1", "10.0.0.5"]
    assert hosts("--allowed-hosts", "a.example, b.example") == ["a.example", "b.example"]
    assert hosts("--allowed-hosts", "*") is None
    # the request-default flags are SamplingParams' own defaults
    args = parser.parse_args(["--model", "m"])
    assert SamplingParams(**{k: getattr(args, k) for k in (
        "num_paths", "max_path_tokens", "min_path_tokens", "max_summary_tokens",
        "min_finished_paths", "temperature", "top_p", "top_k")}) == SamplingParams()


@pytest.fixture(scope="module")
def server_llm_factory(served):
    return served[1]


# ----- tokenization
def test_an_overlong_prompt_is_refused_untokenized(served):
    base, llm = served
    server = APPS[base].state.server
    seen: list[int] = []
    real = llm.tokenizer.encode

    def counting(text, *a, **kw):
        seen.append(len(text))
        return real(text, *a, **kw)

    llm.tokenizer.encode = counting
    try:
        t0 = time.time()
        big = "x" * 900_000  # under the 1 MiB body limit, far beyond 4096 positions
        assert len(big) > server.max_prompt_bytes
        for path, body in (("chat/completions", {"model": MODEL, "messages": [
                {"role": "user", "content": big}]}), ("completions", {"model": MODEL,
                                                                      "prompt": big})):
            r = httpx.post(f"{base}/v1/{path}", content=json.dumps(body), headers=JSON, timeout=30)
            assert r.status_code == 400 and "longer than the model's context" in r.text
            assert r.json()["error"]["param"] == ("prompt" if path == "completions"
                                                  else "messages")
        assert time.time() - t0 < 2.0
        assert all(n < 900_000 for n in seen)  # never tokenized
    finally:
        del llm.tokenizer.encode


def test_large_prompts_do_not_delay_a_small_request(served):
    """Large prompts (slowed down here, as a megabyte prompt on a real tokenizer) tokenize apart
    from small ones: a small request is answered while they are still being tokenized."""
    base, llm = served
    server = APPS[base].state.server
    real = llm.tokenizer.encode

    def slow(text, *a, **kw):
        if len(text) > LARGE_PROMPT_BYTES:
            time.sleep(1.5)
        return real(text, *a, **kw)

    big = "word " * (LARGE_PROMPT_BYTES // 5 + 2000)  # tokenized, then too long for the context
    assert LARGE_PROMPT_BYTES < len(big) < server.max_prompt_bytes
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": big}]})
    llm.tokenizer.encode = slow
    try:
        with ThreadPoolExecutor(5) as pool:
            t0 = time.time()
            bigs = [pool.submit(httpx.post, f"{base}/v1/chat/completions", content=body,
                                headers=JSON, timeout=60) for _ in range(4)]
            time.sleep(0.2)  # the big ones are queued for tokenization first
            t1 = time.time()
            assert chat(client(base)).choices[0].message.content
            small_latency = time.time() - t1
            statuses = [f.result().status_code for f in bigs]
            total = time.time() - t0
    finally:
        del llm.tokenizer.encode
    assert statuses == [400] * 4
    assert total >= 4 * 1.5  # the big ones did wait for each other...
    assert small_latency < 2.0, small_latency  # ...the small one for none of them


# ----- SIGTERM
def test_sigterm_drains(ckpt_dir):
    """SIGTERM: new requests get 503 JSON at once; a short request in flight finishes; the long
    ones are ended at --shutdown-timeout, a stream with an error event then [DONE], a
    non-streaming request with a 503 JSON; then the process exits."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "parathinker.serve.cli", "--model", str(ckpt_dir), "--port",
           str(port), "--num-paths", "2", "--max-summary-tokens", "90", "--max-path-tokens", "12",
           "--device", "cpu", "--log-level", "warning", "--num-kv-blocks", "1024",
           "--shutdown-timeout", "3", "--served-model-name", MODEL]
    proc = subprocess.Popen(cmd, env={**os.environ})
    long = {"num_paths": 2, "max_path_tokens": 3800, "min_path_tokens": 3800,
            "max_summary_tokens": 90}
    try:
        deadline = time.time() + 60
        wait_until_up(proc, base, timeout=60)

        def long_stream() -> list[str]:
            body = json.dumps({"model": MODEL, "stream": True, "parallel": long,
                               "messages": [{"role": "user", "content": QUESTION}]})
            with httpx.stream("POST", f"{base}/v1/chat/completions", content=body,
                              headers=JSON, timeout=60) as r:
                return [line for line in r.iter_lines() if line.startswith("data: ")]

        def long_answer() -> httpx.Response:
            body = json.dumps({"model": MODEL, "parallel": long,
                               "messages": [{"role": "user", "content": QUESTION}]})
            return httpx.post(f"{base}/v1/chat/completions", content=body, headers=JSON,
                              timeout=60)

        with ThreadPoolExecutor(3) as pool:
            stream_f, answer_f = pool.submit(long_stream), pool.submit(long_answer)
            while metrics(base)["parathinker_requests_running"] < 2:
                assert time.time() < deadline + 30
                time.sleep(0.05)
            short_f = pool.submit(lambda: chat(client(base), temperature=0))
            # the short request may finish before it is seen in flight; the long two still drain
            while metrics(base)["parathinker_requests_in_flight"] < 3 and not short_f.done():
                assert time.time() < deadline + 60, "the short request never started"
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            refused = httpx.post(f"{base}/v1/chat/completions", content=BODY, headers=JSON)
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "server_shutting_down"
            assert refused.headers["retry-after"]
            assert httpx.get(f"{base}/health").status_code == 503
            assert short_f.result().choices[0].message.content  # finished within the drain
            events = stream_f.result()
            answer = answer_f.result()
        assert events[-1] == "data: [DONE]"
        assert "shutting down" in json.loads(events[-2][6:])["error"]["message"]
        assert answer.status_code == 503 and "shutting down" in answer.json()["error"]["message"]
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
