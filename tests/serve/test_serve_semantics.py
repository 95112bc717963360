"""OpenAI semantics and failure isolation (issue 13), against a live server: small max_tokens
values work and bound usage.completion_tokens; refusals name their field; a poison request fails
alone and leaves the others' seeded outputs unchanged; malformed bodies get 400 JSON."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from parathinker import SamplingParams
from parathinker.testing.servers import APPS, JSON, MODEL, QUESTION, SMALL, chat, client, wait_for_idle
from parathinker.config import MAX_TEMPERATURE, MIN_TEMPERATURE, MIN_TOP_P
from parathinker.engine.sampler import SamplingTensors, sample_rows

pytest.importorskip("uvicorn")


NUM_KV_BLOCKS = 512


def post(base: str, path: str, body: dict | str) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(f"{base}/v1/{path}", content=content, headers=JSON, timeout=30)


def message(**kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], **kw}


# ----- max_tokens / max_completion_tokens
@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("cap", [5, 16, 40])
def test_small_caps_work_and_bound_completion_tokens(served, name, cap):
    """The summary template is not generated text: a cap of 5 (2 paths of just their tags and
    one summary token) works, and usage.completion_tokens never exceeds the cap, streamed or
    not. min_path_tokens makes the paths use their whole share."""
    base, llm = served
    c = client(base)
    share = min(12, max(2, cap // 3))  # the server default path budget is 12 here
    kw = {name: cap, "seed": 0, "temperature": 1.0,
          "extra_body": {"parallel": {"num_paths": 2, "min_path_tokens": share}}}
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                  **kw)
    u = r.usage
    assert u.completion_tokens <= cap
    assert u.model_extra["path_tokens"] == 2 * share  # both paths ran to their budget
    assert u.completion_tokens == u.model_extra["path_tokens"] + u.model_extra["summary_tokens"]
    chunks = list(c.chat.completions.create(model=MODEL, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": QUESTION}],
                                            **kw))
    assert chunks[-1].usage.completion_tokens == u.completion_tokens <= cap


def test_cap_too_small_and_explicit_budgets_beyond_it(served):
    base, _ = served
    r = post(base, "chat/completions", message(max_completion_tokens=4,
                                               parallel={"num_paths": 2}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"
    r = post(base, "chat/completions", message(max_tokens=30, parallel={**SMALL}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"  # 24 + 21 > 30
    r = post(base, "chat/completions", message(max_tokens=0))
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


# ----- refusals name their field
REFUSED = [
    # (path, body, param)
    ("chat/completions", message(temperature=-1), "temperature"),
    ("chat/completions", message(temperature=3.5e38), "temperature"),
    ("chat/completions", message(top_p=5e-324), "top_p"),
    ("chat/completions", message(top_p=0), "top_p"),
    ("chat/completions", message(seed=1 << 63), "seed"),
    ("chat/completions", message(seed=-(1 << 63) - 1), "seed"),
    ("chat/completions", message(parallel={**SMALL, "num_paths": 0}), "parallel.num_paths"),
    ("chat/completions", message(parallel={**SMALL, "num_paths": 99}), "parallel.num_paths"),
    ("chat/completions", message(parallel={**SMALL, "min_finished_paths": 3}),
     "parallel.min_finished_paths"),
    ("chat/completions", message(parallel={**SMALL, "max_path_tokens": 1}),
     "parallel.max_path_tokens"),
    ("chat/completions", message(parallel={**SMALL, "max_summary_tokens": 5}),
     "parallel.max_summary_tokens"),
    ("chat/completions", message(parallel={**SMALL, "max_path_tokens": 5000}),
     "parallel.max_path_tokens"),
    ("chat/completions", message(messages=[{"role": "user", "content": "word " * 5000}]),
     "messages"),
    ("chat/completions", message(top_logprobs=2), "top_logprobs"),
    ("chat/completions", message(logprobs=True, top_logprobs=21), "top_logprobs"),
    ("chat/completions", message(logprobs=True, stream=True), "logprobs"),
    ("chat/completions", message(echo=True), "echo"),
    ("completions", {"model": MODEL, "prompt": QUESTION, "logprobs": 21}, "logprobs"),
    ("completions", {"model": MODEL, "prompt": QUESTION, "logprobs": 1, "echo": True}, "echo"),
    ("completions", {"model": MODEL, "prompt": QUESTION, "max_tokens": 0}, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": QUESTION, "path_logprobs": True},
     "path_logprobs"),
    ("completions", {"model": MODEL, "prompt": QUESTION, "n": 2, "best_of": 3}, "best_of"),
    ("completions", {"model": MODEL, "prompt": QUESTION, "logprobs": 1, "path_logprobs": True,
                     "include_reasoning": False}, "path_logprobs"),
    ("completions", {"model": MODEL, "prompt": [1, 10**9]}, "prompt"),
]


@pytest.mark.parametrize("path,body,param", REFUSED, ids=[f"{r[2]}-{i}" for i, r in
                                                           enumerate(REFUSED)])
def test_refusals_name_the_field(served, path, body, param):
    r = post(served[0], path, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_logprobs_false_is_accepted(served):
    r = post(served[0], "chat/completions", message(logprobs=False, parallel=SMALL))
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"] is None


# ----- bodies that used to give 500
@pytest.mark.parametrize("body", [
    '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}",
    '{"model": "x", "a": ' + '{"b": ' * 100_000 + "1" + "}" * 100_000 + "}",
    json.dumps(message(messages=[{"role": "user", "content": "hi \ud800"}])),
    json.dumps(message(messages=[{"role": "user", "content": [{"type": "text",
                                                               "text": "\udfff"}]}])),
    json.dumps(message(messages=[{"role": "\ud800", "content": "x"}])),
    json.dumps({"model": MODEL, "prompt": "a \ud800 b"}),
], ids=["nested list", "nested object", "surrogate", "surrogate part", "surrogate role",
        "surrogate prompt"])
def test_malformed_bodies_get_400_json(served, body):
    path = "completions" if '"prompt"' in body else "chat/completions"
    r = post(served[0], path, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


# ----- a poison request fails alone
def test_sampler_bounds_keep_sampling_finite():
    logits = torch.randn(3, 300) * 30  # [R, V] float32
    logits[:, :5] = float("-inf")
    for t, top_p in [(MAX_TEMPERATURE, 1.0), (MIN_TEMPERATURE, 1.0), (1.0, MIN_TOP_P),
                     (MIN_TEMPERATURE, MIN_TOP_P)]:
        st = SamplingTensors.from_rows([t] * 3, [top_p] * 3, [0] * 3, [0] * 3, [0, 1, 2], "cpu")
        ids = sample_rows(logits.clone(), st).tolist()
        assert all(5 <= i < 300 for i in ids)
    for bad in [dict(temperature=3.5e38), dict(temperature=float("nan")), dict(top_p=5e-324),
                dict(temperature=1e-30)]:
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_a_poison_request_fails_alone(served):
    """Seeded requests give the same outputs alone and next to poison: sampler-breaking values
    are refused up front (400, the field named), and a request the engine fails in a step (here
    simulated: failed alone, as the engine reports it) answers 400 while the others go on."""
    base, llm = served
    c = client(base)
    seeds = [11, 12, 13, 14]

    def seeded(seed: int) -> tuple[str, list[str]]:
        r = chat(c, temperature=1.0, seed=seed)
        return r.choices[0].message.content, [p["text"] for p in
                                              r.choices[0].message.model_extra["paths"]]

    alone = [seeded(s) for s in seeds]
    engine, server_loop = llm.engine, APPS[base].state.server.loop
    marker = 77.0  # the request the fake engine fails: temperature 77
    real_step = engine.step

    def step():
        for t in list(server_loop._tracked.values()):
            if t.req.params.temperature == marker and t.req.num_forward_tokens > 0:
                engine.abort(t.req.request_id)
                ended = real_step()
                t.req.status, t.req.error = "failed", "the sampler raised on this request"
                return ended
        return real_step()

    engine.step = step
    try:
        poison = [
            lambda: chat(c, temperature=3.5e38),
            lambda: chat(c, top_p=5e-324),
            lambda: c.completions.create(model=MODEL, prompt=QUESTION, temperature=3.5e38),
            lambda: chat(c, temperature=marker),
        ]
        with ThreadPoolExecutor(8) as pool:
            good = [pool.submit(seeded, s) for s in seeds]
            bad = [pool.submit(p) for p in poison]
            errors = []
            for f in bad:
                with pytest.raises(openai.BadRequestError) as e:
                    f.result()
                errors.append(e.value)
            assert [f.result() for f in good] == alone
    finally:
        del engine.step
    assert [e.body["param"] for e in errors[:3]] == ["temperature", "top_p", "temperature"]
    assert "sampler raised" in errors[3].message
    m = wait_for_idle(base)
    assert m['parathinker_requests_total{status="failed"}'] == 1

