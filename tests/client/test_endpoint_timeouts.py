"""Every HTTP call of eval and build-data ends within --request-timeout, and a run stopped by an
error does not wait for the requests it abandoned (issue 24: `eval --endpoint` hung 620 s after
printing a 400). The server here is a raw socket: it accepts every connection and never answers,
except that a request whose body holds "refuse-me" gets a 400."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

pytest.importorskip("openai")

from parathinker.client.endpoints import EndpointError, Server  # noqa: E402
from tests import ROOT


SILENT_SERVER = textwrap.dedent('''
    import socket, threading

    def silent_server(refuse: bytes = b"refuse-me") -> str:
        """http://127.0.0.1:PORT/v1 of a server that reads each request and never answers it,
        except a body holding `refuse`: HTTP 400."""
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        held = []

        def serve(conn):
            held.append(conn)  # never closed: the client waits for an answer
            data = b""
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
                if refuse in data:
                    body = b'{"error": {"message": "refused", "type": "invalid_request_error"}}'
                    conn.sendall(b"HTTP/1.1 400 Bad Request\\r\\ncontent-type: application/json\\r\\n"
                                 b"content-length: " + str(len(body)).encode() + b"\\r\\n\\r\\n" + body)
                    data = b""

        def accept():
            while True:
                conn, _ = sock.accept()
                threading.Thread(target=serve, args=(conn,), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
''')
exec(SILENT_SERVER)  # silent_server() for the in-process tests; the subprocess gets the same text


def _elapsed(fn) -> tuple[float, BaseException | None]:
    start = time.monotonic()
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - returned for the caller to check
        return time.monotonic() - start, e
    return time.monotonic() - start, None


def test_each_http_call_ends_within_the_request_timeout(tmp_path):
    """A server that accepts and never answers: the model-list probes (eval's check, build-data's
    first model) and a generation call fail within --request-timeout (1 s here; the probes used a
    fixed 15 s before), as a failure the caller reports."""
    from parathinker.eval.backends import EndpointBackend
    from parathinker.train.build_data import BuildConfig, EndpointTeacher

    url = silent_server()  # noqa: F821 - defined by exec above
    server = Server(url, timeout_s=1.0)
    took, err = _elapsed(lambda: server.fetch_card("m"))
    assert took < 4 and "cannot reach the endpoint" in str(err), (took, err)
    took, err = _elapsed(lambda: server.client.completions.create(model="m", prompt="q", max_tokens=1))
    assert took < 4 and "Timeout" in type(err).__name__, (took, err)
    backend = EndpointBackend(url, "m", timeout_s=1.0)
    took, err = _elapsed(backend.check)
    assert took < 4 and isinstance(err, EndpointError) and "no endpoint answers" in str(err), (took, err)
    problems = tmp_path / "p.jsonl"
    problems.write_text('{"id": "a", "problem": "q", "answer": "1"}\n')
    cfg = BuildConfig(teacher=url, problems=str(problems), output=str(tmp_path / "d.jsonl"),
                      request_timeout=1.0)
    took, err = _elapsed(lambda: EndpointTeacher(cfg))
    assert took < 4 and isinstance(err, EndpointError) and "no teacher answers" in str(err), (took, err)


def test_a_run_stopped_by_an_error_exits_without_waiting_for_abandoned_requests():
    """Job 1 hangs (the server never answers it), job 2 gets a 400: the run stops with the 400's
    EndpointError, and the process exits at once, not when job 1's --request-timeout (60 s here)
    runs out."""
    script = SILENT_SERVER + textwrap.dedent('''
        import sys, time
        from parathinker.client.endpoints import Dispatcher, EndpointError, Server

        server = Server(silent_server(), timeout_s=60.0)
        call = lambda prompt: lambda s: s.client.completions.create(model="m", prompt=prompt, max_tokens=1)
        jobs = [("hangs", [call("wait")]), ("refused", [call("refuse-me")])]
        try:
            for _ in Dispatcher([server], concurrency=2, retries=1).run(jobs):
                pass
        except EndpointError as e:
            print("stopped:", e, flush=True)
    ''')
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    took = time.monotonic() - start
    assert "stopped: the endpoint" in r.stdout and "HTTP 400" in r.stdout, r.stdout + r.stderr
    assert r.returncode == 0 and took < 20, (took, r.stderr[-2000:])
