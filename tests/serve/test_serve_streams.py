"""Streams that generic OpenAI clients can read (issue 13), against a live server with the
official openai client: the `chunk.choices[0].delta` loop, the usage chunk only on request,
reasoning that concatenates to the non-streamed text, `reasoning`, include_reasoning."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from parathinker.testing.servers import JSON, MODEL, QUESTION, chat, client, collect_stream, running_server

from parathinker import LLM

pytest.importorskip("uvicorn")
THREE = {"num_paths": 3, "max_path_tokens": 12, "max_summary_tokens": 90, "min_finished_paths": 3}


@pytest.fixture(scope="module")
def base(ckpt_dir):
    llm = LLM(str(ckpt_dir), device="cpu", dtype="float32", num_kv_blocks=512)
    with running_server(llm) as url:
        yield url


def test_generic_loop_reads_every_chunk(base):
    """No stream_options: every chunk has a choice, so the ubiquitous loop never raises."""
    c = client(base)
    deltas = [chunk.choices[0].delta for chunk in chat(c, stream=True, seed=1)]
    assert deltas[0].role == "assistant" and any(d.content for d in deltas)
    texts = [chunk.choices[0].text for chunk in c.completions.create(
        model=MODEL, prompt=QUESTION, stream=True, extra_body={"parallel": THREE})]
    assert "".join(texts)


def test_usage_chunk_only_when_asked(base):
    c = client(base)
    chunks = list(chat(c, stream=True, seed=2, stream_options={"include_usage": True}))
    assert [bool(ch.choices) for ch in chunks][-1] is False and chunks[-1].usage is not None
    assert all(ch.choices for ch in chunks[:-1]) and all(ch.usage is None for ch in chunks[:-1])
    full = chat(c, seed=2)
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()
    off = list(chat(c, stream=True, seed=2, stream_options={"include_usage": False}))
    assert all(ch.choices and ch.usage is None for ch in off)


def test_stream_options_without_stream_is_refused(base):
    body = {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}],
            "stream_options": {"include_usage": True}}
    r = httpx.post(f"{base}/v1/chat/completions", content=json.dumps(body), headers=JSON)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"
    with pytest.raises(openai.BadRequestError, match="stream_options"):
        client(base).completions.create(model=MODEL, prompt=QUESTION, stream=False,
                                        stream_options={"include_usage": True})


@pytest.mark.parametrize("seed", [3, 4])
def test_concatenated_reasoning_equals_the_non_streamed_text(base, seed):
    """What LiteLLM and LangChain's ChatDeepSeek do: concatenate delta.reasoning_content (and
    newer vLLM clients: delta.reasoning) over the stream. Three paths that all run to the end,
    so their tokens interleave in every step."""
    c = client(base)
    full = chat(c, parallel=THREE, temperature=1.0, seed=seed).choices[0].message
    reasoning_content = reasoning = content = ""
    for chunk in chat(c, parallel=THREE, temperature=1.0, seed=seed, stream=True):
        delta = chunk.choices[0].delta
        extra = delta.model_extra or {}
        reasoning_content += extra.get("reasoning_content") or ""
        reasoning += extra.get("reasoning") or ""
        content += delta.content or ""
    assert reasoning_content == full.model_extra["reasoning_content"]
    assert reasoning == full.model_extra["reasoning"] == reasoning_content
    assert content == full.content
    assert reasoning_content.startswith("<think1>") and reasoning_content.endswith("</think3>")


def test_per_path_deltas_are_live_and_opt_in(base):
    c = client(base)
    plain = collect_stream(chat(c, parallel=THREE, seed=5, stream=True))
    assert plain["paths"] == {} and plain["path_finish"] == {}  # nothing extra unless asked
    s = collect_stream(chat(c, parallel=THREE, seed=5, stream=True,
                            stream_options={"include_paths": True}))
    full = chat(c, parallel=THREE, seed=5).choices[0].message.model_extra["paths"]
    assert s["paths"] == {p["index"]: p["text"] for p in full if p["text"]}
    assert s["path_finish"] == {p["index"]: p["finish_reason"] for p in full}
    paths_seen = [k for kind, k in s["events"] if kind == "path"]
    assert paths_seen != sorted(paths_seen)  # live: the paths' deltas interleave, step by step


def test_include_reasoning_false(base):
    c = client(base)
    body = {"parallel": THREE, "include_reasoning": False}
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                  seed=6, extra_body=body)
    msg = r.choices[0].message.model_extra
    assert "reasoning_content" not in msg and "reasoning" not in msg
    assert [set(p) for p in msg["paths"]] == [{"index", "finish_reason", "num_tokens", "confidence"}] * 3
    assert r.usage.completion_tokens_details.reasoning_tokens > 0  # still thought, not shown
    s = collect_stream(c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], seed=6, stream=True,
        stream_options={"include_paths": True}, extra_body=body))
    assert s["reasoning"] == s["reasoning_alt"] == "" and s["paths"] == {}
    assert s["content"] == r.choices[0].message.content
