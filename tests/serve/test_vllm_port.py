"""vLLM's own OpenAI server tests, ported: the cases of vllm-project/vllm
tests/entrypoints/openai/completion/test_completion.py and chat_completion/test_chat.py that mean
something for a parallel-thinking model, through the official openai client against a live
server on the tiny checkpoint. Each test names the vLLM test it ports.

What changes (docs/SERVE.md): the answer (`content`, a completion's `text`) is the summary, its
forced template included, so it is never empty; `max_tokens` caps paths and summary together (a
cap of 5 runs one path of its two tags and three summary tokens); streams refuse logprobs; there
is no structured output, logit bias nor custom role. Where vLLM only checks shapes, the expected
values here come from the Python API (`llm.generate`, the seeds the docs promise) or the
tokenizer.
"""

from __future__ import annotations

import openai
import pytest
from parathinker.testing.servers import MODEL, QUESTION, SMALL, client, wait_for_idle

from parathinker import SamplingParams

pytest.importorskip("uvicorn")

INT64_MIN, INT64_MAX = -2**63, 2**63 - 1


def messages(question: str = QUESTION) -> list[dict]:
    return [{"role": "system", "content": "you are a helpful assistant"},
            {"role": "user", "content": question}]


def small(kw: dict) -> dict:
    """The small budgets, unless a cap is given (then the server derives them from it)."""
    capped = {"max_tokens", "max_completion_tokens"} & set(kw)
    return {} if capped else {"parallel": SMALL}


def chat(base: str, **kw):
    return client(base).chat.completions.create(
        model=MODEL, messages=kw.pop("messages", messages()), extra_body=small(kw), **kw)


def complete(base: str, prompt, **kw):
    return client(base).completions.create(model=MODEL, prompt=prompt, extra_body=small(kw), **kw)


def reference(llm, question: str, **kw):
    """The Python API's answer from `llm`, the session's LLM (tests/conftest.py), not the server's."""
    return llm.generate([question], SamplingParams(**SMALL, **kw))[0]


def summary_tokens(usage) -> int:
    return usage.model_extra["summary_tokens"]


# ----- completions (test_completion.py)
def test_single_completion(served):
    """test_single_completion: max_tokens=5 answers 200; usage adds up; a token-id prompt is
    the same request as its text."""
    base, llm = served
    prompt = llm.format_prompt(QUESTION)
    r = client(base).completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0)
    assert r.id and r.object == "text_completion" and len(r.choices) == 1
    choice, u = r.choices[0], r.usage
    # one path of its two tags, the summary template, then at most 3 generated summary tokens
    assert u.model_extra["path_tokens"] == 2 and 1 <= summary_tokens(u) <= 3
    assert choice.finish_reason == ("length" if summary_tokens(u) == 3 else "stop")
    assert u.completion_tokens == 2 + summary_tokens(u) <= 5
    assert u.prompt_tokens == len(llm.tokenizer.encode(prompt))
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    ids = client(base).completions.create(model=MODEL, prompt=llm.tokenizer.encode(prompt),
                                          max_tokens=5, temperature=0)
    assert ids.choices[0].text == choice.text and choice.text.startswith("By analyzing")


@pytest.mark.parametrize("k", [None, 0, 5])
def test_completion_logprobs(served, k):
    """test_no_logprobs / test_zero_logprobs / test_some_logprobs: `logprobs` k gives the k best
    and the chosen token at each position, keyed by token text (k + 1 entries when the chosen
    one is not among them; fewer when byte tokens decode to the same text, as "\ufffd" does)."""
    base, llm = served
    r = complete(base, llm.format_prompt(QUESTION), temperature=0, logprobs=k)
    lp = r.choices[0].logprobs
    if k is None:
        assert lp is None
        return
    n = len(lp.tokens)
    assert n > 0 and len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert "".join(lp.tokens) == r.choices[0].text
    assert all(1 <= len(top) <= k + 1 for top in lp.top_logprobs)
    assert all(top[t] == logprob for t, logprob, top in
               zip(lp.tokens, lp.token_logprobs, lp.top_logprobs) if t != "\ufffd")
    if k == 0:
        assert [list(top) for top in lp.top_logprobs] == [[t] for t in lp.tokens]


def test_too_many_completion_logprobs(served):
    """test_too_many_completion_logprobs: 21 is over the limit (20), and logprobs on a stream
    are refused here (non-streaming answers only); the server works afterwards."""
    base, llm = served
    prompt = llm.format_prompt(QUESTION)
    with pytest.raises(openai.BadRequestError) as e:
        complete(base, prompt, logprobs=21)
    assert e.value.body["param"] == "logprobs"
    with pytest.raises(openai.BadRequestError):
        list(complete(base, prompt, logprobs=5, stream=True))
    assert complete(base, prompt, max_tokens=5).choices[0].text
    wait_for_idle(base)


def test_completion_streaming(served):
    """test_completion_streaming: the streamed text concatenates to the non-streamed text, and
    only the last choice chunk has a finish_reason."""
    base, llm = served
    prompt = llm.format_prompt(QUESTION)
    single = complete(base, prompt, temperature=1.0, seed=3)
    chunks = list(complete(base, prompt, temperature=1.0, seed=3, stream=True))
    finishes = [ch.choices[0].finish_reason for ch in chunks]
    assert finishes[-1] == single.choices[0].finish_reason and finishes.count(None) == len(chunks) - 1
    assert "".join(ch.choices[0].text for ch in chunks) == single.choices[0].text


def test_parallel_no_streaming(served, llm):
    """test_parallel_no_streaming: n=3 gives 3 choices in order, each a whole ParaThinker
    sample; sample i is the request with seed + i (docs/SERVE.md), so they differ."""
    base, _ = served  # llm: a second LLM, not the server's
    prompt = llm.format_prompt(QUESTION)
    r = complete(base, prompt, n=3, temperature=1.0, seed=42, logprobs=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    refs = [reference(llm, QUESTION, temperature=1.0, seed=42 + i) for i in range(3)]
    for choice, ref in zip(r.choices, refs):
        assert choice.finish_reason in ("stop", "length")
        assert choice.text == ref.summary.text
        assert [p["text"] for p in choice.model_extra["paths"]] == [p.text for p in ref.paths]
        assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) > 0
    assert len({c.model_extra["reasoning_content"] for c in r.choices}) == 3


def test_parallel_streaming(served):
    """test_parallel_streaming: n=3 streamed, chunks interleave with an index; every sample
    ends once and concatenates to the non-streamed sample of that index."""
    base, llm = served
    prompt = llm.format_prompt(QUESTION)
    full = complete(base, prompt, n=3, temperature=1.0, seed=42)
    texts, finishes = {i: "" for i in range(3)}, {i: [] for i in range(3)}
    for ch in complete(base, prompt, n=3, temperature=1.0, seed=42, stream=True):
        (choice,) = ch.choices
        texts[choice.index] += choice.text
        if choice.finish_reason is not None:
            finishes[choice.index].append(choice.finish_reason)
    assert texts == {c.index: c.text for c in full.choices}
    assert finishes == {c.index: [c.finish_reason] for c in full.choices}


def test_batch_completions(served, llm):
    """test_batch_completions: a list of prompts, one choice each, in order; greedy, equal
    prompts give equal answers; streamed, each index ends once."""
    base, _ = served  # llm: a second LLM, not the server's
    prompts = [llm.format_prompt(QUESTION), llm.format_prompt("Name a prime.")]
    r = complete(base, prompts + prompts[:1], temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    refs = [reference(llm, q, temperature=0) for q in (QUESTION, "Name a prime.")]
    assert [c.text for c in r.choices] == [refs[0].summary.text, refs[1].summary.text,
                                           refs[0].summary.text]
    ends = [ch.choices[0].index for ch in complete(base, prompts, temperature=0, stream=True)
            if ch.choices[0].finish_reason is not None]
    assert sorted(ends) == [0, 1]


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_stream_options(served, endpoint):
    """test_completion_stream_options / test_chat_completion_stream_options: no usage unless
    asked; asked, one last chunk with `choices: []` and the non-streamed usage; stream_options
    without a stream is a 400."""
    base, llm = served
    call = (lambda **kw: chat(base, **kw)) if endpoint == "chat" else \
        (lambda **kw: complete(base, llm.format_prompt(QUESTION), **kw))
    kw = dict(temperature=0, max_tokens=20)
    assert all(ch.usage is None for ch in call(stream=True, stream_options={"include_usage": False}, **kw))
    assert all(ch.usage is None for ch in call(stream=True, **kw))
    chunks = list(call(stream=True, stream_options={"include_usage": True}, **kw))
    assert all(ch.usage is None for ch in chunks[:-1]) and chunks[-1].choices == []
    u = chunks[-1].usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u == call(**kw).usage
    for options in ({"include_usage": True}, {"include_usage": None}):
        with pytest.raises(openai.BadRequestError):
            call(stream=False, stream_options=options, **kw)


# ----- chat (test_chat.py)
@pytest.mark.parametrize("top", [None, 0, 5])
def test_chat_logprobs(served, top):
    """test_no_logprobs_chat / test_zero_logprobs_chat / test_some_logprobs_chat: one entry per
    token of `content`, each with exactly `top_logprobs` alternatives."""
    base, _ = served
    kw = {"logprobs": False} if top is None else {"logprobs": True, "top_logprobs": top}
    r = chat(base, temperature=0, max_completion_tokens=10, **kw)
    lp = r.choices[0].logprobs
    if top is None:
        assert lp is None
        return
    assert lp.content and "".join(e.token for e in lp.content) == r.choices[0].message.content
    assert all(len(e.top_logprobs) == top for e in lp.content)
    assert all(e.logprob >= -9999.0 for e in lp.content)


def test_too_many_chat_logprobs(served):
    """test_too_many_chat_logprobs: top_logprobs 21 and 30 are refused, streamed or not, and the
    server answers afterwards."""
    base, _ = served
    with pytest.raises(openai.BadRequestError):
        list(chat(base, logprobs=True, top_logprobs=21, stream=True, max_completion_tokens=10))
    with pytest.raises(openai.BadRequestError) as e:
        chat(base, logprobs=True, top_logprobs=30, max_completion_tokens=10)
    assert e.value.body["param"] == "top_logprobs"
    assert chat(base, max_completion_tokens=10).choices[0].message.content
    wait_for_idle(base)


def test_single_chat_session(served):
    """test_single_chat_session: max_completion_tokens=5 answers 200 within the cap; then a
    second turn with the answer as the assistant's message."""
    base, _ = served
    r = chat(base, max_completion_tokens=5, logprobs=True, top_logprobs=5, seed=0)
    assert r.id and len(r.choices) == 1
    choice, u = r.choices[0], r.usage
    # (seeded: unseeded, a summary that happens to end exactly at its 3-token cap is "stop")
    assert choice.finish_reason == ("length" if summary_tokens(u) == 3 else "stop")
    assert u.completion_tokens <= 5 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert choice.message.role == "assistant" and choice.message.content.startswith("By analyzing")
    turns = messages() + [{"role": "assistant", "content": choice.message.content},
                          {"role": "user", "content": "express your result in json"}]
    r2 = chat(base, messages=turns, max_completion_tokens=5)
    assert r2.choices[0].message.content and r2.usage.prompt_tokens > u.prompt_tokens


def test_chat_streaming(served):
    """test_chat_streaming: a role chunk, then content deltas that concatenate to the
    non-streamed content; only the last chunk has the (same) finish_reason."""
    base, _ = served
    full = chat(base, temperature=0, max_completion_tokens=40)
    chunks = list(chat(base, temperature=0, max_completion_tokens=40, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) \
        == full.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks]
    assert finishes[-1] == full.choices[0].finish_reason and finishes.count(None) == len(chunks) - 1


def test_chat_completion_n(served):
    """test_chat_completion_n_parameter_non_streaming / _streaming / _n_with_seed: n choices in
    order, with content; streamed, every index gets content."""
    base, _ = served
    r = chat(base, n=3, temperature=0.7, seed=42, max_completion_tokens=20)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.content for c in r.choices)
    assert len({c.message.model_extra["reasoning_content"] for c in r.choices}) > 1
    content = {0: "", 1: ""}
    for ch in chat(base, n=2, temperature=0.7, seed=42, max_completion_tokens=20, stream=True):
        for c in ch.choices:
            content[c.index] += c.delta.content or ""
    assert content == {0: r.choices[0].message.content, 1: r.choices[1].message.content}


def test_complex_message_content(served):
    """test_complex_message_content / test_custom_role: text parts are the same prompt as the
    string; a role outside the template's is a 400 naming it."""
    base, _ = served
    parts = [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]
    a = chat(base, messages=parts, temperature=0, seed=0)
    b = chat(base, messages=[{"role": "user", "content": QUESTION}], temperature=0, seed=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as e:
        chat(base, messages=[{"role": "my-custom-role", "content": QUESTION}])
    assert e.value.body["param"].startswith("messages[0]")


def test_long_seed(served):
    """test_long_seed: a seed outside int64 is a 400 naming `seed`; its ends are accepted."""
    base, _ = served
    for seed in (INT64_MIN - 1, INT64_MAX + 1):
        with pytest.raises(openai.BadRequestError) as e:
            chat(base, temperature=0, seed=seed)
        assert e.value.status_code == 400 and e.value.body["param"] == "seed"
    for seed in (INT64_MIN, INT64_MAX):
        assert chat(base, temperature=1.0, seed=seed, max_tokens=5).choices[0].message.content


def test_response_format_and_logit_bias(served):
    """test_response_format_text / _json_object, test_logit_bias: text is accepted; constrained
    JSON and logit bias are not implemented here and are refused, not ignored."""
    base, _ = served
    assert chat(base, max_completion_tokens=10,
                response_format={"type": "text"}).choices[0].message.content
    for kw in ({"response_format": {"type": "json_object"}}, {"logit_bias": {"5": 10}}):
        with pytest.raises(openai.BadRequestError) as e:
            chat(base, **kw)
        assert set(e.value.body) >= {"message", "type", "param", "code"}


def test_unknown_model_is_404(served):
    """The error object of vLLM's test_models checks, for a model that is not served."""
    base, _ = served
    with pytest.raises(openai.NotFoundError) as e:
        client(base).chat.completions.create(model="not-" + MODEL, messages=messages())
    assert e.value.body["code"] == "model_not_found"
