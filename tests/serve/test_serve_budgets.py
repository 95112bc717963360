"""A request that leaves max_path_tokens out gets what the context leaves in the server's layout:
in the reference layout (SPEC §6) that is context - 2 x padded prompt - summary cap, in 16s."""

from __future__ import annotations

import httpx
import pytest

from parathinker import LLM, SamplingParams
from parathinker.serve.fields import APIError
from parathinker.serve.params import param_of, sampling_params
from parathinker.serve.requests import ParsedRequest, parse_chat
from parathinker.spec.budgets import check_context
from parathinker.testing.checkpoints import make_checkpoint
from parathinker.testing.servers import JSON, MODEL, running_server

pytest.importorskip("uvicorn")

PROMPT = "<｜User｜>{question}<｜Assistant｜><think>"  # short: a padded prompt of 16 or 32
CONTEXT = 320


def test_left_out_path_budget_is_fitted_to_the_reference_layout():
    defaults = SamplingParams(num_paths=2, max_path_tokens=16384, max_summary_tokens=100)
    # a 40-token prompt + a second BOS = 41, padded to 48; the summary (100 < 128) starts at
    # 2 x 48 + L: 320 - 96 - 100 = 124 -> 112. (The native rule would give 320 - 40 - 100 = 180.)
    p = sampling_params(ParsedRequest(None, False), defaults, 40, CONTEXT, 5, "reference", True)
    assert p.max_path_tokens == 112
    assert sampling_params(ParsedRequest(None, False), defaults, 40, CONTEXT, 5).max_path_tokens == 180


def test_a_reference_server_runs_a_request_without_budgets(tokenizer, tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", tokenizer=tokenizer, end_boost=1.0, seed=2,
                           max_position_embeddings=CONTEXT)
    llm = LLM(str(ckpt), device="cpu", dtype="float32", layout="reference", prompt_template=PROMPT)
    defaults = SamplingParams(num_paths=2, max_path_tokens=16384, max_summary_tokens=100,
                              temperature=0.0)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "What is 2+3?"}]}
    with running_server(llm, defaults=defaults) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=JSON, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    padded = out["usage"]["prompt_tokens"]  # the prompt the engine ran: BOS + prompt + pads
    assert padded % 16 == 0
    room = (CONTEXT - 2 * padded - 100) // 16 * 16
    paths = out["choices"][0]["message"]["paths"]
    assert len(paths) == 2 and all(0 < p["num_tokens"] <= room for p in paths)


# ----- defaults the client did not set are lowered to fit (issue 22); the rule of docs/SERVE.md
# "Budgets", written out here independently: the context first, then the cap
FLOOR = 64


def expected(cap, prompt_len, context, T, P=4, path=16384, summary=1024):
    """(P, max_path_tokens, max_summary_tokens) by the documented rule, native layout, with
    nothing set by the client."""
    if context - prompt_len - summary < FLOOR:  # the summary shrinks so that paths get 64
        summary = max(T + 1, context - prompt_len - FLOOR)
    fits = context - prompt_len - summary
    if cap is None:
        return P, min(path, fits), summary
    limit = min(path, fits)
    share = lambda p: max(2, min(limit, cap // (p + 1)))  # noqa: E731
    while P > 1 and (P * share(P) + 1 > cap or share(P) < min(FLOOR, limit)):
        P -= 1
    path = share(P)
    return P, path, T + min(summary - T, max(1, cap - P * path))


# typed in from the table in docs/SERVE.md (context 2048, T = 20, 20-token prompt unless noted)
TABLE = [  # (cap, prompt tokens, P, max_path_tokens, max_summary_tokens)
    (None, 20, 4, 1004, 1024),
    (None, 1048, 4, 64, 936),  # a prompt at context - 1,000
    (1, 20, 1, 2, 21), (2, 20, 1, 2, 21), (5, 20, 1, 2, 23),
    (100, 20, 1, 50, 70), (200, 20, 2, 66, 88), (512, 20, 4, 102, 124),
    (300, 1048, 3, 64, 128),
]


@pytest.mark.parametrize("cap,prompt_len,P,path,summary", TABLE)
def test_derived_budgets_are_the_documented_table(cap, prompt_len, P, path, summary):
    assert expected(cap, prompt_len, 2048, 20) == (P, path, summary)
    body = {"messages": [{"role": "user", "content": "q"}]}
    if cap is not None:
        body["max_tokens"] = cap
    p = sampling_params(parse_chat(body), SamplingParams(), prompt_len, 2048, 20)
    assert (p.num_paths, p.max_path_tokens, p.max_summary_tokens) == (P, path, summary)


@pytest.mark.parametrize("context", [300, 2048])
def test_no_request_without_budgets_gets_a_budget_400(context):
    T = 20
    for prompt_len in range(1, context - T - 2, 37):
        for cap in (None, 1, 2, 3, 5, 9, 17, 64, 100, 129, 500, 1000, 5000, 40000):
            body = {"messages": [{"role": "user", "content": "q"}]}
            if cap is not None:
                body["max_completion_tokens"] = cap
            p = sampling_params(parse_chat(body), SamplingParams(), prompt_len, context, T)
            want = expected(cap, prompt_len, context, T)
            assert (p.num_paths, p.max_path_tokens, p.max_summary_tokens) == want
            assert prompt_len + p.max_path_tokens + p.max_summary_tokens <= context
            generated = p.num_paths * p.max_path_tokens + p.max_summary_tokens - T
            assert generated <= max(cap or generated, 3)  # below 3: the smallest request


@pytest.mark.parametrize("body,param,message", [
    ({"max_tokens": 17, "num_paths": 8, "max_path_tokens": 1500}, "max_tokens",
     "use at least 12001"),  # 8 x 1500 + 1
    ({"max_completion_tokens": 5, "parallel": {"num_paths": 3}}, "max_completion_tokens",
     "use at least 7"),  # 3 x 2 + 1
    ({"max_tokens": 100, "parallel": {"num_paths": 1, "max_summary_tokens": 120}}, "max_tokens",
     "use at least 102"),  # 1 x 2 + (120 - 20)
    ({"parallel": {"max_summary_tokens": 5000}}, "parallel.max_summary_tokens", "(5000)"),
    ({"max_summary_tokens": 5000}, "max_summary_tokens", "(5000)"),
    ({"parallel": {"max_path_tokens": 3000}}, "parallel.max_path_tokens", "(3000)"),
])
def test_budgets_the_client_set_are_still_checked(body, param, message):
    parsed = parse_chat({"messages": [{"role": "user", "content": "q"}], **body})
    try:
        p = sampling_params(parsed, SamplingParams(), 20, 2048, 20)
        check_context(20, p.max_path_tokens, p.max_summary_tokens, 2048)  # as llm.validate
    except APIError as e:
        err = e
    except ValueError as e:  # llm.validate's message, mapped as admission does
        err = APIError(400, str(e), param=param_of(str(e), parsed))
    else:
        raise AssertionError("accepted")
    assert err.status == 400 and err.param == param
    assert message in err.message


# ----- live: the server's own defaults (SamplingParams()) on a model with a small context
LIVE_CONTEXT = 1200


@pytest.fixture(scope="module")
def small_context_server(tokenizer, tmp_path_factory):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("ctx") / "ckpt", tokenizer=tokenizer,
                           end_boost=4.0, seed=3, max_position_embeddings=LIVE_CONTEXT)
    llm = LLM(str(ckpt), device="cpu", dtype="float32", num_kv_blocks=256)
    with running_server(llm, defaults=SamplingParams(temperature=0.0)) as url:
        yield url, llm


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("cap", [1, 2, 5])
def test_tiny_caps_answer_200(small_context_server, cap, field):
    url, llm = small_context_server
    r = httpx.post(f"{url}/v1/chat/completions", headers=JSON, timeout=120, json={
        "model": MODEL, "messages": [{"role": "user", "content": "What is 2+3?"}], field: cap})
    assert r.status_code == 200, r.text
    out = r.json()
    P, path, summary = {1: (1, 2, 21), 2: (1, 2, 21), 5: (1, 2, 23)}[cap]  # the rule, T = 20
    T = len(llm.summary_template_ids)
    summary = summary - 20 + T
    paths = out["choices"][0]["message"]["paths"]
    assert len(paths) == P and all(p["num_tokens"] <= path for p in paths)
    usage = out["usage"]
    assert usage["summary_tokens"] <= summary - T
    assert usage["completion_tokens"] <= max(cap, 3)
    finish = out["choices"][0]["finish_reason"]
    # "length" when the summary reached its budget (a last token that ends it is "stop")
    assert finish in ("length", "stop")
    assert usage["summary_tokens"] == summary - T if finish == "length" else True
    assert finish == "stop" if usage["summary_tokens"] < summary - T else True


def test_a_prompt_at_context_minus_1000_runs_with_default_budgets(small_context_server):
    url, llm = small_context_server
    ids = llm.tokenizer.encode(llm.format_prompt("What is 2+3?"))
    filler = llm.tokenizer.encode(" one", add_special_tokens=False)[:1]
    prompt = ids[:1] + filler * (LIVE_CONTEXT - 1000 - len(ids)) + ids[1:]
    assert len(prompt) == LIVE_CONTEXT - 1000
    r = httpx.post(f"{url}/v1/completions", headers=JSON, timeout=300,
                   json={"model": MODEL, "prompt": prompt})
    assert r.status_code == 200, r.text
    out = r.json()
    T = len(llm.summary_template_ids)
    # context 1200 - prompt 200 - 1024 < 64: the summary is lowered so the 4 paths get 64 each
    P, path, summary = 4, 64, LIVE_CONTEXT - 200 - 64
    paths = out["choices"][0]["paths"]
    assert out["usage"]["prompt_tokens"] == 200
    assert len(paths) == P and all(0 < p["num_tokens"] <= path for p in paths)
    assert out["usage"]["summary_tokens"] <= summary - T
