"""`parathinker serve` end to end: the real server (uvicorn on loopback, a tiny checkpoint) driven
by the official openai client and by raw httpx for what a client library would never send.

Each answer is checked against the Python API (`llm.generate` on a second LLM of the same
checkpoint): the server must return the same paths and summary, streamed or not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from parathinker.testing.servers import (JSON, LONG, MODEL, QUESTION, SMALL, chat, client, collect_stream,
                        free_port, metrics, params, running_server, wait_for_idle, wait_until_up)

from parathinker import LLM
from parathinker.serve.app import create_app

uvicorn = pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def server_llm(ckpt_dir):
    return LLM(str(ckpt_dir), device="cpu", dtype="float32", num_kv_blocks=1024)


@pytest.fixture(scope="module")
def base(server_llm):
    with running_server(server_llm) as url:
        yield url


@pytest.fixture(scope="module")
def guarded(ckpt_dir):
    """A second server: API key required, at most one request in flight."""
    llm = LLM(str(ckpt_dir), device="cpu", dtype="float32", num_kv_blocks=1024)
    with running_server(llm, api_key="sekret", max_queued=1) as url:
        yield url


# ----- pieces
@pytest.mark.parametrize("byte_level", [True, False])
def test_incremental_detokenizer_equals_full_decode(tokenizer, byte_level):
    """Random ids (invalid UTF-8 included) fed in random pieces: the same text as one decode."""
    import random

    from parathinker.engine.detokenize import IncrementalDetokenizer

    rng = random.Random(0)
    ids_list = [[rng.randrange(len(tokenizer)) for _ in range(rng.randint(0, 40))]
                for _ in range(100)]
    ids_list.append(tokenizer.encode("héllo 日本語 ✓ <think1> x", add_special_tokens=False))
    for ids in ids_list:
        d = IncrementalDetokenizer(tokenizer)
        assert d.byte_level
        d.byte_level = byte_level  # also check the generic (windowed) strategy
        text, i = "", 0
        while i < len(ids):
            j = min(len(ids), i + rng.randint(1, 4))
            text += d.add(ids[i:j])
            i = j
        assert text + d.flush() == tokenizer.decode(ids, skip_special_tokens=False)


# ----- the happy paths
def test_health_and_models(base):
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    models = client(base).models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client(base).models.retrieve(MODEL).id == MODEL


def test_chat_matches_the_python_api(base, llm):
    parallel = {"num_paths": 3, "max_path_tokens": 12, "max_summary_tokens": 90,
                "min_finished_paths": 2}
    r = chat(client(base), parallel=parallel, temperature=0.8, seed=7)
    (ref,) = llm.generate([QUESTION], params(num_paths=3, min_finished_paths=2, temperature=0.8,
                                             seed=7))
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content == ref.summary.text
    paths = msg.model_extra["paths"]
    assert [(p["index"], p["text"], p["finish_reason"]) for p in paths] == \
        [(p.index, p.text, p.finish_reason) for p in ref.paths]
    reasoning = "\n".join(f"<think{p.index}>{p.text}</think{p.index}>" for p in ref.paths)
    assert msg.model_extra["reasoning_content"] == msg.model_extra["reasoning"] == reasoning
    expected_finish = {"end": "stop", "budget": "length"}[ref.summary.finish_reason]
    assert r.choices[0].finish_reason == expected_finish
    u = r.usage
    assert u.prompt_tokens == len(ref.prompt_token_ids)
    assert u.model_extra["path_tokens"] == ref.num_path_tokens
    assert u.completion_tokens_details.reasoning_tokens == ref.num_path_tokens
    generated = len(ref.summary.token_ids) - len(llm.summary_template_ids)  # not the template
    assert u.model_extra["summary_tokens"] == generated
    assert u.completion_tokens == ref.num_path_tokens + generated
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_plain_request_uses_server_defaults(base):
    """No extension, no sampling fields: the server's defaults (2 paths here) apply."""
    r = client(base).chat.completions.create(model=MODEL, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}])
    assert len(r.choices[0].message.model_extra["paths"]) == 2
    assert r.choices[0].message.content.startswith("By analyzing")


def test_streaming_chat_equals_non_streaming(base):
    c = client(base)
    kw = dict(temperature=0.9, seed=11)
    full = chat(c, **kw)
    s = collect_stream(chat(c, stream=True, stream_options={"include_usage": True,
                                                            "include_paths": True}, **kw))
    msg = full.choices[0].message
    assert s["role"] == "assistant"
    assert s["content"] == msg.content
    assert s["reasoning"] == s["reasoning_alt"] == msg.model_extra["reasoning_content"]
    assert s["paths"] == {p["index"]: p["text"] for p in msg.model_extra["paths"] if p["text"]}
    assert s["path_finish"] == {p["index"]: p["finish_reason"] for p in msg.model_extra["paths"]}
    assert s["finish"] == full.choices[0].finish_reason
    assert s["usage"].model_dump() == full.usage.model_dump()
    kinds = [e[0] for e in s["events"]]  # every path chunk comes before the summary's first
    assert "summary" in kinds and "summary" not in kinds[:kinds.index("summary")]
    assert kinds.index("summary") == kinds.count("path") + kinds.count("reasoning")
    assert kinds.count("path") > 2  # the paths came token by token, not in one piece each


def test_completions(base, llm):
    c = client(base)
    prompt = llm.format_prompt(QUESTION)  # /v1/completions takes the prompt verbatim
    (ref,) = llm.generate([QUESTION], params(temperature=0))
    r = c.completions.create(model=MODEL, prompt=prompt, temperature=0,
                             extra_body={"parallel": SMALL})
    assert r.choices[0].text == ref.summary.text
    assert [p["text"] for p in r.choices[0].model_extra["paths"]] == [p.text for p in ref.paths]
    r_ids = c.completions.create(model=MODEL, prompt=ref.prompt_token_ids, temperature=0,
                                 extra_body={"parallel": SMALL})
    assert r_ids.choices[0].text == ref.summary.text
    text, readable, paths, usage = "", "", {}, None
    for ch in c.completions.create(model=MODEL, prompt=prompt, temperature=0, stream=True,
                                   stream_options={"include_usage": True, "include_paths": True},
                                   extra_body={"parallel": SMALL}):
        usage = ch.usage or usage
        for choice in ch.choices:
            text += choice.text
            extra = choice.model_extra or {}
            readable += extra.get("reasoning_content") or ""
            if extra.get("path_content"):
                paths[extra["path_index"]] = paths.get(extra["path_index"], "") \
                    + extra["path_content"]
    assert text == ref.summary.text
    assert readable == r.choices[0].model_extra["reasoning_content"]
    assert paths == {p.index: p.text for p in ref.paths if p.text}
    assert usage.completion_tokens == r.usage.completion_tokens


def test_twenty_concurrent_clients_are_batched(base, llm):
    questions = [f"What is {i}+3?" for i in range(20)]
    parallel = {**SMALL, "min_path_tokens": 12}  # every request thinks for exactly 11 steps
    refs = llm.generate(questions, params(min_path_tokens=12, temperature=0))
    steps_before = metrics(base)["parathinker_engine_steps_total"]
    c = client(base)

    def one(i: int):
        if i % 2:  # half stream, half do not
            stream = chat(c, questions[i], parallel, temperature=0, stream=True)
            return collect_stream(stream)["content"]
        return chat(c, questions[i], parallel, temperature=0).choices[0].message.content

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(one, range(20)))
    assert answers == [r.summary.text for r in refs]
    m = wait_for_idle(base)
    # one at a time would take >= 20 * 12 steps; shared steps take far fewer
    assert m["parathinker_engine_steps_total"] - steps_before < 20 * 12 / 2


# ----- clients that leave
def test_disconnect_mid_stream_frees_blocks(base):
    m0 = wait_for_idle(base)
    stream = chat(client(base), parallel=LONG, stream=True)
    seen = 0
    for ch in stream:  # paths arrive while the request is still thinking
        if (ch.choices[0].delta.model_extra or {}).get("reasoning_content"):
            seen += 1
            if seen == 3:
                break
    m = metrics(base)
    assert m["parathinker_kv_cache_blocks_used"] > 0 and m["parathinker_requests_running"] == 1
    stream.close()
    m = wait_for_idle(base)
    assert m['parathinker_requests_total{status="aborted"}'] == \
        m0['parathinker_requests_total{status="aborted"}'] + 1


def test_disconnect_while_waiting_for_a_non_streaming_answer(base):
    m0 = wait_for_idle(base)
    body = {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "parallel": LONG}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/chat/completions", json=body, timeout=0.5)
    m = wait_for_idle(base)
    assert m['parathinker_requests_total{status="aborted"}'] == \
        m0['parathinker_requests_total{status="aborted"}'] + 1


# ----- bad input
TOO_LONG = "word " * 5000  # more tokens than the tiny model's 4096 positions


def _chat_body(**kw):
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": QUESTION}],
                       "parallel": SMALL, **kw})


BAD_INPUT = [
    # (name, path, raw body, status, piece of the message)
    ("malformed json", "chat/completions", "{", 400, "not valid JSON"),
    ("not an object", "chat/completions", "[1, 2]", 400, "JSON object"),
    ("NaN", "chat/completions", _chat_body()[:-1] + ', "temperature": NaN}', 400, "NaN"),
    ("no messages", "chat/completions", json.dumps({"model": MODEL}), 400, "messages"),
    ("messages wrong type", "chat/completions", _chat_body(messages="hi"), 400, "messages"),
    ("bad role", "chat/completions", _chat_body(messages=[{"role": "robot", "content": "x"}]), 400,
     "role"),
    ("last not user", "chat/completions",
     _chat_body(messages=[{"role": "assistant", "content": "x"}]), 400, "last message"),
    ("temperature string", "chat/completions", _chat_body(temperature="hot"), 400, "temperature"),
    ("max_tokens bool", "chat/completions", _chat_body(max_tokens=True), 400, "max_tokens"),
    ("stream string", "chat/completions", _chat_body(stream="yes"), 400, "stream"),
    ("parallel not object", "chat/completions", _chat_body(parallel=4), 400, "parallel"),
    ("parallel unknown key", "chat/completions", _chat_body(parallel={"paths": 4}), 400, "unknown"),
    ("num_paths float", "chat/completions", _chat_body(parallel={"num_paths": 2.5}), 400,
     "parallel.num_paths"),
    ("unknown model", "chat/completions", _chat_body(model="gpt-4"), 404, "does not exist"),
    ("num_paths 0", "chat/completions", _chat_body(parallel={**SMALL, "num_paths": 0}), 400,
     "num_paths must be >= 1"),
    ("num_paths 99", "chat/completions", _chat_body(parallel={**SMALL, "num_paths": 99}), 400,
     "num_paths=99 exceeds"),
    ("min_finished_paths", "chat/completions",
     _chat_body(parallel={**SMALL, "min_finished_paths": 3}), 400, "min_finished_paths"),
    ("max_path_tokens 1", "chat/completions",
     _chat_body(parallel={**SMALL, "max_path_tokens": 1}), 400, "max_path_tokens"),
    ("summary below template", "chat/completions",
     _chat_body(parallel={**SMALL, "max_summary_tokens": 5}), 400, "summary template"),
    ("max_tokens below 2 paths", "chat/completions", _chat_body(max_tokens=4,
     parallel={"num_paths": 2}), 400, "'max_tokens'=4 cannot hold 2 path(s)"),
    ("budgets beyond context", "chat/completions",
     _chat_body(parallel={**SMALL, "max_path_tokens": 5000}), 400, "exceed the model's context"),
    ("prompt beyond context", "chat/completions",
     _chat_body(messages=[{"role": "user", "content": TOO_LONG}]), 400,
     "longer than the model's context"),
    ("negative temperature", "chat/completions", _chat_body(temperature=-1), 400, "temperature"),
    ("top_p 0", "chat/completions", _chat_body(top_p=0), 400, "top_p"),
    ("n 0", "chat/completions", _chat_body(n=0), 400, "'n' must be in 1..16"),
    ("n 17", "chat/completions", _chat_body(n=17), 400, "'n' must be in 1..16"),
    ("stop 5", "chat/completions", _chat_body(stop=list("abcde")), 400, "at most 4"),
    ("stop empty", "chat/completions", _chat_body(stop=[""]), 400, "must not be empty"),
    ("stop int", "chat/completions", _chat_body(stop=3), 400, "string or a list"),
    ("seed too big", "chat/completions", _chat_body(seed=1 << 70), 400, "seed"),
    ("seed above int64", "chat/completions", _chat_body(seed=1 << 63), 400, "int64"),
    ("prompt missing", "completions", json.dumps({"model": MODEL}), 400, "prompt"),
    ("prompt batch of mixed", "completions", json.dumps({"model": MODEL, "prompt": ["a", 3]}),
     400, "non-empty list of those"),
    ("empty batch", "completions", json.dumps({"model": MODEL, "prompt": []}), 400, "non-empty"),
    ("bad id in batch", "completions",
     json.dumps({"model": MODEL, "prompt": [[1], [1, 10**9]], "parallel": SMALL}), 400,
     "(prompt[1])"),
    ("token id out of range", "completions",
     json.dumps({"model": MODEL, "prompt": [1, 10**9], "parallel": SMALL}), 400, "outside"),
    ("oversized body", "chat/completions",
     _chat_body(messages=[{"role": "user", "content": "x" * (2 << 20)}]), 413, "larger than"),
    ("unknown route", "chat/complete", _chat_body(), 404, "Not Found"),
]


@pytest.mark.parametrize("name,path,body,status,match", BAD_INPUT, ids=[b[0] for b in BAD_INPUT])
def test_bad_input(base, name, path, body, status, match):
    r = httpx.post(f"{base}/v1/{path}", content=body, timeout=30, headers=JSON)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert match in err["message"] and err["type"]


def test_chunked_oversized_body_and_the_server_survives(base):
    def chunks():
        for _ in range(40):
            yield b"x" * 65536  # 2.5 MiB, no Content-Length

    r = httpx.post(f"{base}/v1/chat/completions", content=chunks(), timeout=30, headers=JSON)
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]
    wait_for_idle(base)  # no bad request left a block or a slot behind
    assert chat(client(base)).choices[0].message.content


def test_oversized_bodies_get_their_413_not_a_reset(base):
    """The server drains an oversized body before it answers and closes: answering while the
    client still sends resets the connection (it did in about 1 of 30 tries before)."""
    body = _chat_body(messages=[{"role": "user", "content": "x" * (2 << 20)}])
    statuses = []
    for _ in range(40):
        try:
            statuses.append(httpx.post(f"{base}/v1/chat/completions", content=body, timeout=30,
                                       headers=JSON).status_code)
        except httpx.TransportError as e:
            statuses.append(type(e).__name__)
    assert statuses == [413] * 40, statuses


def test_engine_failures_answer_errors_and_free_blocks(base, server_llm, ckpt_dir):
    """An exception inside a step fails the requests in flight (500), not the server."""
    engine = server_llm.engine

    def broken_step():
        del engine.step  # fail once, then the class's step again
        raise RuntimeError("boom")

    engine.step = broken_step
    with pytest.raises(openai.InternalServerError, match="boom"):
        chat(client(base))
    wait_for_idle(base)
    assert chat(client(base)).choices[0].message.content
    # a request that may grow larger than the whole KV pool is refused before it runs: 400
    # worst case: the prompt's blocks, 2 paths x 1 block of 12 tokens, 6 blocks of 90 summary
    # tokens; the pool holds one block less (so 70 summary tokens, 5 blocks, fit)
    num_prompt_blocks = -(-len(server_llm.encode_prompts([QUESTION], None)[0]) // 16)
    small = LLM(str(ckpt_dir), device="cpu", dtype="float32", block_size=16,
                num_kv_blocks=num_prompt_blocks + 2 + 5)
    with running_server(small) as url:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError, match="KV blocks") as e:
                chat(client(url), stream=stream)
            assert e.value.body["code"] == "kv_cache_too_small"
        m = wait_for_idle(url)
        assert m["parathinker_engine_steps_total"] == 0  # nothing ran, not even a prefill
        assert m['parathinker_requests_total{status="rejected"}'] == 2
        assert chat(client(url), parallel={**SMALL, "max_summary_tokens": 70}).choices


def test_chat_prompts(server_llm):
    from parathinker.serve.requests import ParsedRequest, chat_prompt

    fmt = server_llm.format_prompt
    assert chat_prompt([{"role": "user", "content": "q"}], fmt) == fmt("q")
    turns = [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
             {"role": "assistant", "content": "b"}, {"role": "user", "content": "q"}]
    history = "S<｜User｜>a<｜Assistant｜>b<｜end▁of▁sentence｜>"
    assert chat_prompt(turns, fmt) == history + fmt("q")
    tok = server_llm.tokenizer
    with pytest.raises(ValueError, match="no chat template"):
        create_app(server_llm, MODEL, chat_template="tokenizer")
    tok.chat_template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}[bot]"
    try:
        server = create_app(server_llm, MODEL, chat_template="tokenizer").state.server
        ids = server.encode("chat", ParsedRequest(None, False, messages=turns[-1:]))
        assert ids == tok.encode("[user] q[bot]", add_special_tokens=False)
    finally:
        tok.chat_template = None


# ----- API key and the queue limit
def test_api_key(guarded):
    with pytest.raises(openai.AuthenticationError):
        chat(client(guarded, "wrong"))
    r = httpx.post(f"{guarded}/v1/chat/completions", content=_chat_body(), headers=JSON)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{guarded}/v1/models").status_code == 401
    assert chat(client(guarded, "sekret")).choices[0].message.content
    assert httpx.get(f"{guarded}/health").status_code == 200  # probes need no key
    assert metrics(guarded)['parathinker_requests_total{status="rejected"}'] >= 3


def test_too_many_requests_queued(guarded):
    c = client(guarded, "sekret")
    stream = chat(c, parallel=LONG, stream=True)
    next(iter(stream))  # the long request is in flight (limit: 1)
    with pytest.raises(openai.RateLimitError) as e:
        chat(c)
    assert int(e.value.response.headers["retry-after"]) >= 1
    stream.close()
    wait_for_idle(guarded)
    assert chat(c).choices[0].message.content


# ----- the command line
def test_cli_serves_on_loopback_by_default(ckpt_dir):
    from parathinker.serve.cli import add_serve_args

    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    args = parser.parse_args(["--model", "m"])
    assert (args.host, args.port, args.max_body_bytes) == ("127.0.0.1", 8000, 1 << 20)
    port = free_port()
    env = {**os.environ, "PARATHINKER_API_KEY": "k"}
    cmd = [sys.executable, "-m", "parathinker.serve.cli", "--model", str(ckpt_dir), "--port",
           str(port), "--num-paths", "2", "--max-summary-tokens", "90", "--max-path-tokens", "12",
           "--device", "cpu", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env)
    try:
        wait_until_up(proc, f"http://127.0.0.1:{port}", timeout=60)
        r = client(f"http://127.0.0.1:{port}", "k").chat.completions.create(
            model=str(ckpt_dir), messages=[{"role": "user", "content": QUESTION}])
        assert len(r.choices[0].message.model_extra["paths"]) == 2
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401  # key from env
    finally:
        proc.terminate()
        proc.wait(30)
