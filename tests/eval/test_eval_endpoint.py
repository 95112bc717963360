"""`parathinker eval --endpoint URL`: the sequential and majority baselines against a fake
OpenAI-compatible server (FastAPI on 127.0.0.1, in a thread), and clear errors naming the URL
(several servers, and parathinker mode on `parathinker serve`: tests/eval/test_eval_scaleout.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("openai")
fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from parathinker.eval.cli import main
from parathinker.eval.plan import derive_seed
from parathinker.spec.tokens import SEQUENTIAL_PROMPT_TEMPLATE
from parathinker.testing.servers import AppServer, free_port

PROBLEMS = [{"id": f"q{i}", "problem": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(1, 4)]


def answer_for(problem: dict[str, Any], seed: int) -> str:
    """The fake model: right when the seed is even, else a wrong answer shared by all problems."""
    return problem["answer"] if seed % 2 == 0 else "-7"


class FakeServer(AppServer):
    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.fail_on: str | None = None  # a question that gets HTTP 500 ("*": every one)
        self.delay_s = 0.0  # how long each completion takes
        app = fastapi.FastAPI()

        @app.get("/v1/models")
        def models() -> dict[str, Any]:
            return {"object": "list", "data": [{"id": "fake-r1", "object": "model", "created": 0,
                                                "owned_by": "test"}]}

        @app.post("/v1/completions")
        def completions(body: dict[str, Any]) -> Any:
            self.bodies.append(body)
            problem = next(p for p in PROBLEMS if p["problem"] in body["prompt"])
            time.sleep(self.delay_s)
            if self.fail_on in ("*", problem["problem"]):
                return fastapi.responses.JSONResponse({"error": {"message": "boom", "type": "server_error"}},
                                                      status_code=500)
            answer = answer_for(problem, body["seed"])
            text = f"Let me think. {problem['problem']} So the answer is \\boxed{{{answer}}}."
            return {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
                    "usage": {"prompt_tokens": 17, "completion_tokens": 9, "total_tokens": 26}}

        super().__init__(app)


@pytest.fixture(scope="module")
def server() -> Iterator[FakeServer]:
    with FakeServer() as s:
        yield s


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    path = tmp_path / "toy.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS), encoding="utf-8")
    return path


def _args(url: str, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", "fake-r1", "--endpoint", url, "--benchmark", "toy", "--data", str(data),
            "--mode", "sequential,majority", "--majority-n", "3", "--samples", "2", "--max-tokens", "300",
            "--majority-max-tokens", "100", "--temperature", "0.6", "--seed", "5", "--output", str(out), *extra]


def _records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_sequential_and_majority_against_an_openai_compatible_server(server, data, tmp_path, capsys) -> None:
    server.bodies.clear()
    out = tmp_path / "out"
    assert main(_args(f"http://127.0.0.1:{server.port}", data, out)) == 0  # no /v1: added
    records = _records(out)
    assert len(records) == 3 * 2 * 2  # problems x samples x (sequential, maj@3)
    by_problem = {p["id"]: p for p in PROBLEMS}
    for r in records:
        problem = by_problem[r["id"]]
        if r["mode"] == "sequential":
            assert r["num_paths"] == 1 and r["correct"] == (r["seed"] % 2 == 0)
            assert r["answer"] == answer_for(problem, r["seed"]) and r["finish_reason"] == "end"
            assert (r["prompt_tokens"], r["total_tokens"]) == (17, 9)
        else:
            seeds = [derive_seed(r["seed"], j) for j in range(3)]
            answers = [answer_for(problem, s) for s in seeds]
            assert r["num_paths"] == 3 and r["path_answers"] == answers
            assert r["path_correct"] == [a == problem["answer"] for a in answers]
            right = answers.count(problem["answer"])
            assert r["correct"] == (right >= 2) and r["any_path_correct"] == (right >= 1)
            assert r["answer"] == (problem["answer"] if right >= 2 else "-7") and r["total_tokens"] == 27
        assert r["settings"]["backend"] == "endpoint" and r["settings"]["model"] == "fake-r1"
    assert len(server.bodies) == 3 * 2 * (1 + 3)
    seeds = [b["seed"] for b in server.bodies]
    assert len(set(seeds)) == len(seeds)  # every trace its own seed
    prompts = {SEQUENTIAL_PROMPT_TEMPLATE.replace("{question}", p["problem"]) for p in PROBLEMS}
    for b in server.bodies:
        assert b["prompt"] in prompts and b["model"] == "fake-r1" and b["temperature"] == 0.6
        assert b["max_tokens"] in (300, 100) and b.get("n", 1) == 1
    assert sorted(b["max_tokens"] for b in server.bodies).count(300) == 6  # sequential: its own budget
    doc = json.loads((out / "summary.json").read_text())
    assert set(doc["summary"]["toy"]) == {"sequential", "majority@3"}
    assert doc["config"]["endpoint"] == f"http://127.0.0.1:{server.port}" and doc["config"]["backend"] == "endpoint"
    assert "majority@3" in (out / "report.md").read_text() and (out / "accuracy_vs_paths.png").exists()


def test_unreachable_endpoint_names_the_url_and_keeps_results(server, data, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert main(_args(f"http://127.0.0.1:{server.port}/v1", data, out, "--limit", "1")) == 0
    before = (out / "samples.jsonl").read_bytes()
    capsys.readouterr()
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    assert main(_args(dead, data, out, "--resume")) == 1
    err = capsys.readouterr().err
    assert f"cannot reach the endpoint {dead}" in err and "--resume" in err
    assert (out / "samples.jsonl").read_bytes() == before

    assert main(_args(f"http://127.0.0.1:{server.port}/v1", data, out, "--resume", "--model", "gpt-9")) == 1
    assert "does not serve model 'gpt-9'; it serves fake-r1" in capsys.readouterr().err
    assert main(_args("localhost:8000", data, tmp_path / "o2")) == 2
    assert "--endpoint must be an http(s) URL" in capsys.readouterr().err


def test_server_error_midway_stops_the_run_and_keeps_what_finished(server, data, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    server.fail_on = PROBLEMS[2]["problem"]
    try:
        rc = main(_args(f"http://127.0.0.1:{server.port}", data, out, "--mode", "sequential",
                        "--batch-size", "1", "--request-timeout", "20", "--server-retries", "2"))
    finally:
        server.fail_on = None
    assert rc == 1
    err = capsys.readouterr().err
    assert f"the endpoint http://127.0.0.1:{server.port}/v1 answered HTTP 500" in err
    assert "out of rotation, retried in 1 s" in err and "no endpoint is left to run on" in err
    kept = _records(out)
    assert {(r["id"], r["sample"]) for r in kept} == {("q1", 0), ("q2", 0)}  # sample 0 sweep, up to q3
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert runs[-1]["status"] == "failed"
    assert main(_args(f"http://127.0.0.1:{server.port}", data, out, "--mode", "sequential", "--resume")) == 0
    assert len(_records(out)) == 6 and _records(out)[:2] == kept
