"""The SFT pipeline end to end on CPU with tiny models: a tiny teacher -> build-data -> train a
base model (tokens and seg tables added) -> the loss falls -> the checkpoint loads in LLM -> a
training forward over one of its generated requests reproduces its logits -> an interrupted run
resumes from its last checkpoint and ends exactly where an uninterrupted run does. Also the
OpenAI-compatible teacher against a fake local server."""

import json
import socket
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from parathinker.testing.checkpoints import make_checkpoint, make_tokenizer

from parathinker import SamplingParams
from parathinker.model import load_model
from parathinker.train.request_row import pack_request
from parathinker.engine.slow_twin import generate_request
from parathinker.train.checkpoints import latest_checkpoint
from parathinker.train.cli import main, train_config
from parathinker.train.loss import attention_meta, token_loss_sum
from parathinker.train.pack import IGNORE, row_targets
from parathinker.train.trainer import train

PROBLEMS = [("What is 2+3?", "5"), ("Find x if 2x + 3 = 11.", "4"), ("What is 6 * 7?", "42"),
            ("What is the sum of the first 10 positive integers?", "55")]
STEPS = 30


def write_problems(path, problems=PROBLEMS):
    path.write_text("".join(json.dumps({"id": f"p{i}", "problem": q, "answer": a}) + "\n"
                            for i, (q, a) in enumerate(problems)))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("sft")


@pytest.fixture(scope="module")
def data(work, ckpt_dir):
    problems = write_problems(work / "problems.jsonl")
    out = work / "data.jsonl"
    args = ["build-data", "--teacher", str(ckpt_dir), "--problems", str(problems), "--output", str(out),
            "--traces-per-problem", "3", "--paths", "2", "--select", "all", "--include-truncated",
            "--max-tokens", "16", "--temperature", "1.0", "--device", "cpu", "--seed", "1"]
    assert main(args) == 0
    return out, args


TRAIN_ARGS = ["--max-steps", str(STEPS), "--learning-rate", "3e-3", "--grad-accum", "1",
              "--save-steps", "10", "--cpu", "--seed", "0"]


@pytest.fixture(scope="module")
def base_dir(work):
    """A base model: no ParaThinker tokens in its tokenizer, no seg tables in its weights."""
    return make_checkpoint(work / "base", tokenizer=make_tokenizer(with_paths=False), seg_tables=False,
                           seed=3)


@pytest.fixture(scope="module")
def trained(work, data, base_dir):
    out = work / "run"
    assert main(["train", "--model", str(base_dir), "--data", str(data[0]), "--output", str(out),
                 *TRAIN_ARGS]) == 0
    return out


def test_build_data_writes_samples_and_resumes(data, work):
    out, args = data
    samples = read_jsonl(out)
    assert len(samples) == len(PROBLEMS)
    for s, (q, a) in zip(samples, PROBLEMS):
        assert s["question"] == q and len(s["paths"]) == 2 and s["summary"] == f" \\boxed{{{a}}}."
    store = work / "data.jsonl.traces" / "samples.jsonl"
    traces = store.read_text().splitlines()
    # a trace cut by --max-tokens (kept: --include-truncated) is marked cut, the others not
    finish = {json.loads(t)["path"]: json.loads(t)["finish_reason"] for t in traces}
    flags = [s.get("cut", [False, False]) for s in samples]
    assert flags == [[finish[p] != "end" for p in s["paths"]] for s in samples]
    assert any(map(any, flags))  # 16 tokens: some traces were truncated
    assert len(traces) == 3 * len(PROBLEMS)
    # drop two stored traces, as if interrupted: only those are sampled again, identically
    store.write_text("\n".join(traces[:-2]) + "\n")
    before = out.read_text()
    assert main(args) == 0
    assert sorted(store.read_text().splitlines()) == sorted(traces)
    assert out.read_text() == before


def test_build_data_refuses_to_resume_traces_made_otherwise(data, work, capsys):
    """Traces of another teacher or other sampling settings are never mixed in (nor would the
    new settings be written over their provenance): exit 2, each differing field named."""
    out, args = data
    store = work / "data.jsonl.traces"
    before = (store / "samples.jsonl").read_text()
    other = [*args[:-2], "--seed", "9"]
    other[other.index("--temperature") + 1] = "0.7"
    capsys.readouterr()
    assert main(other) == 2
    err = capsys.readouterr().err
    assert "temperature: 1.0 there, 0.7 now" in err and "seed: 1 there, 9 now" in err
    assert (store / "samples.jsonl").read_text() == before
    settings = json.loads((store / "trace_settings.json").read_text())
    assert settings["temperature"] == 1.0 and settings["seed"] == 1


def test_build_data_that_produces_nothing_fails_loudly(work, ckpt_dir, tmp_path, capsys):
    problems = write_problems(tmp_path / "p.jsonl", PROBLEMS[:2])
    out = tmp_path / "none.jsonl"
    # 3 tokens per trace: every one hits --max-tokens, and truncated traces are rejected
    code = main(["build-data", "--teacher", str(ckpt_dir), "--problems", str(problems), "--output",
                 str(out), "--traces-per-problem", "2", "--paths", "2", "--select", "all",
                 "--max-tokens", "3", "--device", "cpu", "--temperature", "1.0"])
    err = capsys.readouterr().err
    assert code == 1 and "no usable sample" in err
    assert "Of 4 traces" in err and "4 hit --max-tokens (rejected" in err


def test_build_data_with_paths_of_one_request(work, ckpt_dir):
    problems = write_problems(work / "p2.jsonl", PROBLEMS[:2])
    out = work / "paths.jsonl"
    assert main(["build-data", "--teacher", str(ckpt_dir), "--teacher-mode", "paths", "--problems",
                 str(problems), "--output", str(out), "--traces-per-problem", "3", "--paths", "2-3",
                 "--select", "all", "--include-truncated", "--max-tokens", "10", "--device", "cpu",
                 "--temperature", "1.0"]) == 0
    traces = read_jsonl(work / "paths.jsonl.traces" / "samples.jsonl")
    assert sorted((t["id"], t["sample"]) for t in traces) == [(f"p{i}", j) for i in range(2)
                                                              for j in range(3)]
    assert all("<think" not in t["path"] for t in traces)
    assert [len(s["paths"]) in (2, 3) for s in read_jsonl(out)] == [True, True]


def test_training_from_base_model_lowers_loss(trained):
    metrics = read_jsonl(trained / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    losses = [m["loss"] for m in metrics]
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5]), losses
    assert all(m["learning_rate"] == 3e-3 and m["num_tokens"] > 0 for m in metrics)
    resolved = json.loads((trained / "train_config.json").read_text())["resolved"]
    assert resolved["initialised_seg_tables"] and resolved["attention"] == "sdpa"


def test_checkpoints_load_in_llm_and_reproduce_generation_logits(trained):
    from parathinker import LLM

    assert latest_checkpoint(trained).name == f"checkpoint-{STEPS}"
    final, last = load_model(trained), load_model(latest_checkpoint(trained))
    assert all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), last.state_dict().values()))
    llm = LLM(str(trained), device="cpu", dtype="float32")  # the engine's loader, prepacked linears
    assert llm.ctrl.max_paths == 8
    params = SamplingParams(num_paths=2, max_path_tokens=12, temperature=0.0, min_finished_paths=2,
                            max_summary_tokens=len(llm.summary_template_ids) + 8)
    prompt = llm.encode_prompts([PROBLEMS[0][0]], None)[0]
    raw = generate_request(llm.model, llm.ctrl, prompt, llm.summary_template_ids, params,
                           record_logits=True)
    assert llm.generate([PROBLEMS[0][0]], params)[0].summary.token_ids == raw.summary_token_ids
    row = pack_request(prompt, raw.path_token_ids, raw.summary_token_ids)
    t = lambda x: torch.tensor([x])  # noqa: E731
    with torch.no_grad():  # the training forward: plain linears, the packed row, its dense mask
        hidden = final(t(row.input_ids), t(row.positions), t(row.segment_ids),
                       attention_meta(t(row.regions), t(row.doc_ids), "sdpa"))
        logits = final.compute_logits(hidden)[0]
        targets = row_targets(row)
        loss, count = token_loss_sum(final, hidden, t(targets))
    worst, expected_loss, n = 0.0, 0.0, 0
    for (region, j), gen_logits in raw.logits.items():
        i = row.starts[(0, region)] + j
        worst = max(worst, (logits[i] - gen_logits).abs().max().item())
        if targets[i] != IGNORE:  # the target is the token the generator put next in that region
            expected_loss += F.cross_entropy(gen_logits[None], t(targets[i])).item()
            n += 1
    assert worst <= 1e-4
    assert n == count.item() and abs(loss.item() - expected_loss) <= 1e-3


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_from_last_checkpoint(trained, work, data, base_dir):
    out = work / "interrupted"
    args = ["train", "--model", str(base_dir), "--data", str(data[0]), "--output", str(out), *TRAIN_ARGS]
    cfg = train_config(_parse(args))

    def stop(record):
        if record["step"] == 14:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, on_log=stop)
    assert latest_checkpoint(out).name == "checkpoint-10"
    assert len(read_jsonl(out / "metrics.jsonl")) == 14
    assert main(args) == 2  # checkpoints there, and no --resume: refuse to overwrite
    assert main(args + ["--resume"]) == 0
    got, want = read_jsonl(out / "metrics.jsonl"), read_jsonl(trained / "metrics.jsonl")
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(got, want)) <= 1e-5
    resumed, straight = load_model(out), load_model(trained)
    assert max((a - b).abs().max().item()
               for a, b in zip(resumed.state_dict().values(), straight.state_dict().values())) <= 1e-5


def _parse(argv):
    import argparse

    from parathinker.train.cli import add_train_args

    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    add_train_args(sub.add_parser("train"))
    return p.parse_args(argv)


# ----- the OpenAI-compatible teacher against a fake local server

def fake_server(requests):
    """A tiny OpenAI-compatible server: for "never" questions every trace is wrong; otherwise
    trace i of a request answers 5 when i is even, 7 when odd."""
    from fastapi import FastAPI, Request

    app = FastAPI()

    def texts(question, n):
        return [f"I think. \\boxed{{{7 if 'never' in question or i % 2 else 5}}}" for i in range(n)]

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "fake-teacher", "object": "model", "created": 0,
                                            "owned_by": "test"}]}

    @app.post("/v1/chat/completions")
    async def chat(req: Request):
        body = await req.json()
        requests.append(body)
        question = body["messages"][0]["content"]
        choices = [{"index": i, "finish_reason": "stop", "message": {"role": "assistant", "content": c}}
                   for i, c in enumerate(texts(question, body["n"]))]
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": choices}

    @app.post("/v1/completions")
    async def completions(req: Request):
        body = await req.json()
        requests.append(body)
        choices = [{"index": i, "finish_reason": "stop", "text": c, "logprobs": None}
                   for i, c in enumerate(texts(body["prompt"], body["n"]))]
        return {"id": "x", "object": "text_completion", "created": 0, "model": body["model"],
                "choices": choices}

    return app


@pytest.fixture()
def endpoint():
    import uvicorn

    requests = []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(fake_server(requests), host="127.0.0.1", port=port,
                                           log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    assert server.started, "fake server did not start"
    yield f"http://127.0.0.1:{port}/v1", requests
    server.should_exit = True
    thread.join(timeout=5)


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_endpoint_teacher_and_selection(tmp_path, endpoint, api):
    url, requests = endpoint
    problems = write_problems(tmp_path / "p.jsonl", [("2+3, never right", "5"), ("What is 2+3?", "5"),
                                                     ("And 3+2?", "5")])
    out = tmp_path / "d.jsonl"
    assert main(["build-data", "--teacher", url, "--api", api, "--problems", str(problems),
                 "--output", str(out), "--traces-per-problem", "4", "--paths", "2-3",
                 "--samples-per-problem", "2", "--request-timeout", "10"]) == 0
    assert len(requests) == 3 and all(r["n"] == 4 and r["model"] == "fake-teacher" for r in requests)
    samples = read_jsonl(out)
    assert samples and all(s["question"] != "2+3, never right" for s in samples)
    for s in samples:
        assert 2 <= len(s["paths"]) <= 3 and any("\\boxed{5}" in p for p in s["paths"])
    stats = json.loads((tmp_path / "d.jsonl.traces" / "build_config.json").read_text())["stats"]
    assert stats["correct_traces"] == 4 and stats["problems_without_sample"] == 1
    # all-correct needs P correct traces: only P = 2 can be met (2 correct of 4)
    out2 = tmp_path / "d2.jsonl"
    assert main(["build-data", "--teacher", url, "--api", api, "--problems", str(problems),
                 "--output", str(out2), "--traces-per-problem", "4", "--paths", "2",
                 "--select", "all-correct"]) == 0
    assert len(requests) == 6
    assert all(all("\\boxed{5}" in p for p in s["paths"]) for s in read_jsonl(out2))


def test_build_data_from_a_local_base_model_teacher(work, base_dir, tmp_path):
    """A base model (no ParaThinker tokens) is a valid local teacher for plain traces."""
    problems = write_problems(tmp_path / "problems.jsonl", PROBLEMS[:2])
    out = tmp_path / "data.jsonl"
    args = ["build-data", "--teacher", str(base_dir), "--problems", str(problems), "--output", str(out),
            "--traces-per-problem", "2", "--paths", "2", "--select", "all", "--include-truncated",
            "--max-tokens", "10", "--device", "cpu", "--seed", "2"]
    assert main(args) == 0
    samples = read_jsonl(out)
    assert len(samples) == 2 and all(len(s["paths"]) == 2 for s in samples)
    assert main([*args[:-2], "--seed", "3", "--teacher-mode", "paths", "--output", str(tmp_path / "x.jsonl")]) == 2
