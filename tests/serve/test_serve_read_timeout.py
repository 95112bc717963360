"""A stalled client never holds a connection (issue 22): request headers or a body that do not
arrive within the read timeout close the connection (a body after a 408), probed with raw
sockets that send half a request and stall; a slow client within the timeout is served."""

from __future__ import annotations

import json
import socket
import time

import pytest
from parathinker.testing.servers import running_server

from parathinker import LLM

pytest.importorskip("uvicorn")
TIMEOUT = 1.0


@pytest.fixture(scope="module")
def port(ckpt_dir):
    llm = LLM(str(ckpt_dir), device="cpu", dtype="float32", num_kv_blocks=64)
    with running_server(llm, read_timeout=TIMEOUT) as url:
        yield int(url.rsplit(":", 1)[1])


def stalled(port: int, data: bytes) -> tuple[bytes, float]:
    """Send `data`, then wait: (everything the server sent until it closed, seconds it took)."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(10 * TIMEOUT)
        start = time.monotonic()
        s.sendall(data)
        received = b""
        while chunk := s.recv(4096):  # socket.timeout here: the server held the connection
            received += chunk
        return received, time.monotonic() - start


@pytest.mark.parametrize("data", [b"", b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n",
                                  b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: 1"])
def test_half_sent_headers_are_closed_after_the_timeout(port, data):
    received, took = stalled(port, data)
    assert received == b""
    assert TIMEOUT * 0.9 <= took < 5 * TIMEOUT


def test_half_sent_body_gets_408_and_is_closed(port):
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    received, took = stalled(port, head + body[:10])
    assert TIMEOUT * 0.9 <= took < 5 * TIMEOUT
    status, _, rest = received.partition(b"\r\n")
    assert status.startswith(b"HTTP/1.1 408")
    headers, _, payload = rest.partition(b"\r\n\r\n")
    assert b"connection: close" in headers.lower()
    assert json.loads(payload)["error"]["code"] == "request_timeout"


def test_a_slow_client_within_the_timeout_is_served_twice(port):
    """Headers in pieces, each pause shorter than the timeout, on one keep-alive connection: the
    timer restarts after each response instead of closing the connection."""
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(5)
        for _ in range(2):
            time.sleep(TIMEOUT * 0.3)  # 2 x 0.6 in all: more than one timeout
            s.sendall(request[:20])
            time.sleep(TIMEOUT * 0.3)
            s.sendall(request[20:])
            answer = s.recv(4096)
            while b"ok" not in answer:  # the head and the body may come in two writes
                answer += s.recv(4096)
            assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"status": "ok"}')
