"""`parathinker eval --endpoint` reads each server's /v1/models card: the default budgets are
lowered to the served context, a card that disagrees with the run (rope_scaling, layout,
max_model_len) is refused, and a server that was down at the start is probed again and used.

The servers are fakes of `parathinker serve` (FastAPI on 127.0.0.1, in a thread) that refuse,
as the real one does, a request whose positions exceed their context (SPEC §4: prompt +
max_path_tokens + max_summary_tokens <= context), counting the prompt with the checkpoint's
tokenizer.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("openai")
fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from parathinker.eval.cli import main
from parathinker.model.checkpoint import load_tokenizer
from parathinker.spec.tokens import DEFAULT_PROMPT_TEMPLATE
from parathinker.testing.servers import AppServer
from tests.eval.test_eval_endpoint import FakeServer

PROBLEMS = [{"id": f"q{i}", "problem": f"What is {i} + {i}? " + "Think hard. " * i, "answer": str(2 * i)}
            for i in range(1, 4)]


class FakeParaServer(AppServer):
    """Answers chat completions in the `parallel` extension's shape; its card says what it runs."""

    def __init__(self, model: str, tokenizer: Any, port: int | None = None, **card: Any) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.delay_s = 0.0  # how long each answer takes
        self.card = {"id": model, "object": "model", "created": 0, "owned_by": "parathinker",
                     "max_model_len": 1000, "max_paths": 8, "rope_scaling": None, "layout": "native",
                     "summary_template_tokens": 5, **card}
        app = fastapi.FastAPI()

        @app.get("/v1/models")
        def models() -> dict[str, Any]:
            return {"object": "list", "data": [self.card]}

        @app.post("/v1/chat/completions")
        def chat(body: dict[str, Any]) -> Any:
            self.bodies.append(body)
            time.sleep(self.delay_s)
            question = body["messages"][0]["content"]
            problem = next(p for p in PROBLEMS if p["problem"] == question)
            par = body["parallel"]
            prompt = len(tokenizer.encode(DEFAULT_PROMPT_TEMPLATE.replace("{question}", question)))
            total = prompt + par["max_path_tokens"] + par["max_summary_tokens"]
            if total > self.card["max_model_len"]:
                return fastapi.responses.JSONResponse(
                    {"error": {"message": f"{total} positions exceed the model's context",
                               "type": "invalid_request_error", "param": "messages"}}, status_code=400)
            paths = [{"index": i, "text": f"so \\boxed{{{problem['answer']}}}", "finish_reason": "end",
                      "num_tokens": 4}
                     for i in range(par["num_paths"])]
            return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop", "paths": paths,
                                 "message": {"role": "assistant", "paths": paths,
                                             "content": f"\\boxed{{{problem['answer']}}}"}}],
                    "usage": {"prompt_tokens": prompt, "completion_tokens": 9, "total_tokens": prompt + 9,
                              "summary_tokens": 3}}

        super().__init__(app, port)


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    path = tmp_path / "toy.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS), encoding="utf-8")
    return path


def _args(model: Path, urls: list[str], data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), *[f for u in urls for f in ("--endpoint", u)], "--benchmark", "toy",
            "--data", str(data), "--mode", "parathinker", "--paths", "2", "--output", str(out), *extra]


def _with_context(ckpt_dir: Path, tmp_path: Path, context: int) -> Path:
    """The checkpoint's config and tokenizer (no weights: an endpoint run loads none) with
    another max_position_embeddings, as a model served with that context."""
    out = tmp_path / f"ckpt-{context}"
    out.mkdir()
    for f in ckpt_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    config = json.loads((ckpt_dir / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "max_position_embeddings": context}))
    return out


def _longest_prompt(ckpt_dir: Path) -> int:
    tok = load_tokenizer(ckpt_dir)
    return max(len(tok.encode(DEFAULT_PROMPT_TEMPLATE.replace("{question}", p["problem"]))) for p in PROBLEMS)


def test_default_budgets_are_lowered_to_the_served_context(ckpt_dir, data, tmp_path, capsys):
    tok, model = load_tokenizer(ckpt_dir), _with_context(ckpt_dir, tmp_path, 700)
    with FakeParaServer(str(model), tok, max_model_len=700) as server:
        out = tmp_path / "out"
        assert main(_args(model, [server.url], data, out, "--max-summary-tokens", "300")) == 0, \
            capsys.readouterr().err
    # SPEC §4: every path restarts after the prompt and the summary follows the longest one
    room = 700 - _longest_prompt(ckpt_dir) - 300
    assert 0 < room < 16384
    assert len(server.bodies) == 3 and {b["parallel"]["max_path_tokens"] for b in server.bodies} == {room}
    assert {b["parallel"]["max_summary_tokens"] for b in server.bodies} == {300}
    assert "--max-path-tokens 16384 does not fit" in capsys.readouterr().err
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(r["correct"] for r in records)
    assert {r["settings"]["max_path_tokens"] for r in records} == {room}


def test_a_budget_that_fits_is_sent_unchanged(ckpt_dir, data, tmp_path):
    tok, model = load_tokenizer(ckpt_dir), _with_context(ckpt_dir, tmp_path, 700)
    with FakeParaServer(str(model), tok, max_model_len=700) as server:
        assert main(_args(model, [server.url], data, tmp_path / "o", "--max-path-tokens", "40",
                          "--max-summary-tokens", "300")) == 0
    assert {b["parallel"]["max_path_tokens"] for b in server.bodies} == {40}


@pytest.mark.parametrize("field, theirs, flags, message", [
    ("max_model_len", 2048, (), "reports max_model_len 2048 in /v1/models, but this run (--model"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4096},
     ("--rope-scaling", "none"), "reports rope_scaling {'rope_type': 'yarn'"),
    ("layout", "reference", (), "runs `parathinker serve --layout reference`"),
])
def test_a_server_whose_card_disagrees_with_the_run_is_refused(ckpt_dir, data, tmp_path, capsys,
                                                                field, theirs, flags, message):
    tok = load_tokenizer(ckpt_dir)
    card = {"max_model_len": 4096}  # the tiny checkpoint's own
    with FakeParaServer(str(ckpt_dir), tok, **card) as good, \
            FakeParaServer(str(ckpt_dir), tok, **{**card, field: theirs}) as odd:
        out = tmp_path / "out"
        assert main(_args(ckpt_dir, [good.url, odd.url], data, out, "--max-path-tokens", "40",
                          "--max-summary-tokens", "50", *flags)) == 2
    err = capsys.readouterr().err
    assert f"the endpoint {odd.url}/v1 " in err and message in err, err
    assert not good.bodies and not odd.bodies and not (out / "samples.jsonl").exists()


def test_servers_that_disagree_with_each_other_are_refused(data, tmp_path, capsys, ckpt_dir):
    tok = load_tokenizer(ckpt_dir)
    with FakeParaServer("served-name", tok, max_model_len=1000) as a, \
            FakeParaServer("served-name", tok, max_model_len=1200) as b:
        args = _args(ckpt_dir, [a.url, b.url], data, tmp_path / "o", "--max-path-tokens", "40")
        args[1] = "served-name"  # not a local checkpoint: only the servers can be compared
        assert main(args) == 2
    err = capsys.readouterr().err
    assert f"the endpoint {b.url}/v1 reports max_model_len 1200" in err
    assert f"the endpoint {a.url}/v1 has 1000" in err


def _start_when(condition: Any, server: Any) -> threading.Thread:
    """Start `server` (a fake not yet listening) once `condition()` holds: a server that comes up
    while the run is under way."""
    def start() -> None:
        deadline = time.monotonic() + 60
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.05)
        server.__enter__()

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    return thread


def test_a_server_down_at_the_start_is_probed_again_and_used(tmp_path, capsys):
    problems = tmp_path / "toy.jsonl"
    from tests.eval.test_eval_endpoint import PROBLEMS as PLAIN

    problems.write_text("".join(json.dumps(p) + "\n" for p in PLAIN), encoding="utf-8")
    late = FakeServer()  # not listening yet
    with FakeServer() as slow:
        slow.delay_s = 1.0
        urls = [f"http://127.0.0.1:{slow.port}", f"http://127.0.0.1:{late.port}"]
        starter = _start_when(lambda: slow.bodies, late)
        try:
            assert main(["--model", "fake-r1", *[f for u in urls for f in ("--endpoint", u)],
                         "--benchmark", "toy", "--data", str(problems), "--mode", "sequential",
                         "--samples", "6", "--max-tokens", "50", "--concurrency", "1",
                         "--output", str(tmp_path / "out")]) == 0
        finally:
            starter.join(60)
            late.__exit__()
    err = capsys.readouterr().err
    assert f"cannot reach the endpoint {urls[1]}/v1" in err and "not used until it answers" in err
    assert f"the endpoint {urls[1]}/v1 answers again: back in rotation" in err
    records = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    by = {u: sum(r["server"] == f"{u}/v1" for r in records) for u in urls}
    # 18 samples at 1 s each on the slow one alone; the late one, once up, takes most of them
    assert len(records) == 18 and by[urls[1]] >= 6 and by[urls[1]] == len(late.bodies)


def test_a_late_server_whose_card_disagrees_is_not_used(ckpt_dir, data, tmp_path, capsys):
    tok = load_tokenizer(ckpt_dir)
    late = FakeParaServer(str(ckpt_dir), tok, max_model_len=2048)  # not listening yet
    with FakeParaServer(str(ckpt_dir), tok, max_model_len=4096) as good:
        good.delay_s = 1.0
        starter = _start_when(lambda: good.bodies, late)
        try:
            assert main(_args(ckpt_dir, [good.url, late.url], data, tmp_path / "out", "--samples", "3",
                              "--max-path-tokens", "40", "--max-summary-tokens", "50",
                              "--concurrency", "1")) == 0
        finally:
            starter.join(60)
            late.__exit__()
    err = capsys.readouterr().err
    assert f"the endpoint {late.url}/v1 reports max_model_len 2048" in err and "not used in this run" in err
    assert not late.bodies and len(good.bodies) == 9


def test_build_data_fits_max_tokens_to_a_parathinker_teacher(ckpt_dir, data, tmp_path, capsys):
    """build-data --teacher URL on `parathinker serve`: each request has paths of --max-tokens + 2
    tags and a summary of the card's template + 1 token, so --max-tokens' default (16,384) is
    lowered to what the served context leaves after the longest prompt."""
    from parathinker.train.cli import main as train_main

    tok, model = load_tokenizer(ckpt_dir), _with_context(ckpt_dir, tmp_path, 700)
    with FakeParaServer(str(model), tok, max_model_len=700, summary_template_tokens=5) as server:
        rc = train_main(["build-data", "--teacher", server.url, "--problems", str(data), "--output",
                         str(tmp_path / "d.jsonl"), "--traces-per-problem", "2", "--paths", "1-2"])
        assert rc == 0, capsys.readouterr().err
    room = 700 - _longest_prompt(ckpt_dir) - (5 + 1)  # SPEC §4: prompt + path + summary
    assert len(server.bodies) == 3
    assert {(b["parallel"]["max_path_tokens"], b["parallel"]["max_summary_tokens"]) for b in server.bodies} \
        == {(room, 6)}
    assert "--max-tokens 16384 does not fit" in capsys.readouterr().err
