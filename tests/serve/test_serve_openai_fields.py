"""The OpenAI fields evaluation harnesses send (issue 16): `stop`, `n`, `logprobs` /
`top_logprobs`, batched prompts and `echo`, through the official openai client against a live
server on the tiny checkpoint.

Expected values are computed here: stop cuts from the unstopped text, n samples and batches from
`llm.generate` with the seeds the docs promise (seed + i), and logprobs from a dense forward of
the whole context (prompt, paths, summary; SPEC §4 visibility written out token by token, as in
tests/oracle.py), softmaxed here with the request's temperature and top-k.
"""

from __future__ import annotations

import random

import httpx
import pytest
import torch
from parathinker.testing.servers import JSON, MODEL, QUESTION, SMALL, client, wait_for_idle

from parathinker import SamplingParams
from parathinker.attention.dense import DenseAttention
from parathinker.serve.choices import StopFilter

pytest.importorskip("uvicorn")
QUESTIONS = [QUESTION, "What is 7*8?", "Name a prime."]




def params(**kw) -> SamplingParams:
    return SamplingParams(**{**SMALL, **kw})


def template_text(llm) -> str:
    return llm.tokenizer.decode(llm.summary_template_ids[1:], skip_special_tokens=False)


def generated(llm, text: str) -> str:
    t = template_text(llm)
    assert text.startswith(t)
    return text[len(t):]


def chat(base, question=QUESTION, **kw):
    return client(base).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}],
        extra_body={"parallel": SMALL, **kw.pop("extra_body", {})}, **kw)


def long_summary(llm):
    """A seed whose summary generates enough text to cut (greedy summaries of the tiny
    checkpoint end at once), and a stop string: 3 clean characters early in it."""
    for seed in range(20):
        (ref,) = llm.generate([QUESTION], params(temperature=1.0, seed=seed))
        gen = generated(llm, ref.summary.text)
        for a in range(2, len(gen) // 2):
            stop = gen[a: a + 3]
            if len(gen) >= 12 and stop.isprintable() and "\ufffd" not in stop:
                return seed, ref, stop
    raise AssertionError("no seed gives a summary of 12+ characters")


# ----- stop
def test_stop_cuts_the_summary_plain_and_streaming(served, llm):
    base, _ = served  # llm: a second LLM, not the server's
    seed, ref, stop = long_summary(llm)
    gen = generated(llm, ref.summary.text)
    expected = template_text(llm) + gen[: gen.find(stop)]
    kw = dict(temperature=1.0, seed=seed)
    r = chat(base, stop=[stop, "\x00never"], **kw)
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == "stop"
    full = chat(base, **kw)
    assert full.choices[0].message.content == ref.summary.text  # without stop: untouched
    # the engine ended the summary early: fewer tokens were generated than without stop
    assert r.usage.model_extra["summary_tokens"] < full.usage.model_extra["summary_tokens"]
    content, finish = "", None
    for ch in chat(base, stop=stop, stream=True, **kw):
        content += ch.choices[0].delta.content or ""
        finish = ch.choices[0].finish_reason or finish
    assert content == expected and finish == "stop"
    text = ""
    for ch in client(base).completions.create(model=MODEL, prompt=llm.format_prompt(QUESTION),
                                              stop=stop, stream=True,
                                              extra_body={"parallel": SMALL}, **kw):
        text += ch.choices[0].text
    assert text == expected
    wait_for_idle(base)


def test_stop_prefix_held_back_then_released_and_template_never_stops(served, llm):
    """A stop string whose start is the text's end is held back while it could still match,
    then sent; one that only occurs in the template does not stop anything."""
    base, _ = served  # llm: a second LLM, not the server's
    seed, ref, _ = long_summary(llm)
    gen = generated(llm, ref.summary.text)
    tail_stop = gen[-2:] + "\x00"  # starts like the end of the text, never completes
    template_word = template_text(llm).split()[2]  # a word of the template
    assert template_word not in gen
    for stop in (tail_stop, template_word):
        content, finish = "", None
        for ch in chat(base, temperature=1.0, seed=seed, stop=[stop], stream=True):
            content += ch.choices[0].delta.content or ""
            finish = ch.choices[0].finish_reason or finish
        assert content == ref.summary.text
        assert finish == {"end": "stop", "budget": "length"}[ref.summary.finish_reason]


def test_stop_filter_streams_exactly_the_cut_text():
    """Random texts, stop lists and chunkings (a chunk = one token's text): what the filter
    lets out, concatenated, is the text up to the earliest stop occurrence (after the first
    `skip` characters) within the text up to the chunk in which a stop first completed (the
    engine ends the summary there, as vLLM checks stops token by token)."""
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 30)))
        stop = tuple("".join(rng.choice("abc") for _ in range(rng.randint(1, 4)))
                     for _ in range(rng.randint(1, 3)))
        skip = rng.randint(0, 5)
        ends, i = [], 0
        while i < len(text):
            i = min(len(text), i + rng.randint(1, 5))
            ends.append(i)
        expected = text
        for end in ends:
            hits = [j for j in (text[:end].find(s, skip) for s in stop) if j >= 0]
            if hits:
                expected = text[: min(hits)]
                break
        f, out, start = StopFilter(stop, skip), "", 0
        for end in ends:
            out += f.add(text[start:end])
            start = end
            assert expected.startswith(out)  # never past a stop
        out += f.add("", final=True)
        assert out == expected, (text, stop, skip)


# ----- n
def test_n_samples_are_the_seeded_requests_and_usage_sums(served, llm):
    base, _ = served  # llm: a second LLM, not the server's
    r = chat(base, temperature=0.9, seed=5, n=3)
    refs = [llm.generate([QUESTION], params(temperature=0.9, seed=5 + i))[0] for i in range(3)]
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c, ref in zip(r.choices, refs):
        assert c.message.content == ref.summary.text
        assert [p["text"] for p in c.message.model_extra["paths"]] == [p.text for p in ref.paths]
    assert len({c.message.model_extra["reasoning_content"] for c in r.choices}) == 3
    u = r.usage
    assert u.prompt_tokens == len(refs[0].prompt_token_ids)  # the prompt once
    generated_tokens = sum(len(x.summary.token_ids) - len(llm.summary_template_ids) for x in refs)
    assert u.completion_tokens == sum(x.num_path_tokens for x in refs) + generated_tokens
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    content: dict[int, str] = {}
    finish: dict[int, str] = {}
    for ch in chat(base, temperature=0.9, seed=5, n=3, stream=True):
        c = ch.choices[0]
        content[c.index] = content.get(c.index, "") + (c.delta.content or "")
        if c.finish_reason:
            finish[c.index] = c.finish_reason
    assert content == {i: ref.summary.text for i, ref in enumerate(refs)}
    assert finish == {i: c.finish_reason for i, c in enumerate(r.choices)}
    wait_for_idle(base)


# ----- batched prompts, echo
def test_batched_prompts_with_n_in_order(served, llm):
    base, _ = served  # llm: a second LLM, not the server's
    prompts = [llm.format_prompt(q) for q in QUESTIONS[:2]]
    ids = llm.tokenizer.encode(prompts[1])
    r = client(base).completions.create(model=MODEL, prompt=[prompts[0], ids], n=2, seed=3,
                                        temperature=0.8, extra_body={"parallel": SMALL})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    refs = [llm.generate([q], params(temperature=0.8, seed=3 + j))[0]
            for q in QUESTIONS[:2] for j in range(2)]
    assert [c.text for c in r.choices] == [x.summary.text for x in refs]
    assert r.usage.prompt_tokens == len(refs[0].prompt_token_ids) + len(refs[2].prompt_token_ids)
    assert r.usage.model_extra["path_tokens"] == sum(x.num_path_tokens for x in refs)
    texts: dict[int, str] = {}
    for ch in client(base).completions.create(model=MODEL, prompt=prompts, n=2, seed=3,
                                              temperature=0.8, stream=True,
                                              extra_body={"parallel": SMALL}):
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {i: x.summary.text for i, x in enumerate(refs)}


def test_echo_prepends_the_prompt(served, llm):
    base, _ = served  # llm: a second LLM, not the server's
    prompt = llm.format_prompt(QUESTION)
    (ref,) = llm.generate([QUESTION], params(temperature=0))
    r = client(base).completions.create(model=MODEL, prompt=prompt, echo=True, temperature=0,
                                        extra_body={"parallel": SMALL})
    assert r.choices[0].text == prompt + ref.summary.text
    text = "".join(ch.choices[0].text for ch in client(base).completions.create(
        model=MODEL, prompt=prompt, echo=True, temperature=0, stream=True,
        extra_body={"parallel": SMALL}))
    assert text == prompt + ref.summary.text


def test_loglikelihood_requests_are_refused_with_the_reason(served):
    base, _ = served
    for body in ({"prompt": "2+2=", "echo": True, "logprobs": 1, "max_tokens": 1},
                 {"prompt": "2+2=", "max_tokens": 0}):
        r = httpx.post(f"{base}/v1/completions", json={"model": MODEL, **body}, headers=JSON)
        assert r.status_code == 400
        msg = r.json()["error"]["message"]
        assert "loglikelihood" in msg and "generate_until" in msg


# ----- logprobs
def dense_summary_logits(llm, out) -> torch.Tensor:
    """Logits predicting each summary token after the first, from one dense forward over
    prompt, paths and summary (SPEC §4), independent of the engine's paged attention."""
    prompt, paths, summary = out.prompt_token_ids, [p.token_ids for p in out.paths], \
        out.summary.token_ids
    lp, longest = len(prompt), max(len(p) for p in paths)
    ids, pos, seg, owner = list(prompt), list(range(lp)), [0] * lp, [-1] * lp
    for k, p in enumerate(paths):
        ids += p
        pos += list(range(lp, lp + len(p)))
        seg += [k + 1] * len(p)
        owner += [k] * len(p)
    first = len(ids)
    ids += summary
    pos += list(range(lp + longest, lp + longest + len(summary)))
    seg += [0] * len(summary)
    owner += [99] * len(summary)
    visible = [[j <= i and (owner[j] in (-1, owner[i]) or owner[i] == 99) for j in range(len(ids))]
               for i in range(len(ids))]
    t = lambda x: torch.tensor([x], dtype=torch.long)  # noqa: E731
    with torch.no_grad():
        hidden = llm.model(t(ids), t(pos), t(seg),
                           DenseAttention(torch.tensor([visible], dtype=torch.bool)))
        logits = llm.model.compute_logits(hidden[0, first: len(ids) - 1]).float()
    ctrl = llm.ctrl
    banned = list(ctrl.think_open) + list(ctrl.think_close) + [ctrl.summary_open] + [
        x for x in (ctrl.base_think_open, ctrl.base_think_close, ctrl.pad) if x is not None]
    logits[:, banned] = float("-inf")
    return logits  # row i predicts summary token i + 1


@pytest.mark.parametrize("temperature,top_k", [(0.0, 0), (0.7, 5)])
def test_chat_logprobs_are_the_sampled_distribution(served, llm, temperature, top_k):
    base, _ = served  # llm: a second LLM, not the server's
    kw = dict(temperature=temperature, seed=21)
    r = chat(base, logprobs=True, top_logprobs=5, extra_body={"top_k": top_k}, **kw)
    (ref,) = llm.generate([QUESTION], params(top_k=top_k, **kw))
    choice = r.choices[0]
    assert choice.message.content == ref.summary.text
    entries = choice.logprobs.content
    joined = b"".join(bytes(e.bytes) for e in entries)  # raw bytes; the text replaces bad UTF-8
    assert joined.decode("utf-8", errors="replace") == choice.message.content
    num_template = len(llm.summary_template_ids) - 1  # forced, but scored like sampled ones
    ids = ref.summary.token_ids
    num_text = len(ids) - 1 - (ref.summary.finish_reason == "end")  # no <summary>, no end token
    assert len(entries) == num_text and entries[num_template:]
    x = dense_summary_logits(llm, ref) / (temperature or 1.0)
    if top_k:
        x[x < x.topk(top_k, -1).values[:, -1:]] = float("-inf")
    expected = x.log_softmax(-1)
    for row, e in enumerate(entries):  # entry `row` is summary token row + 1, template included
        token = ids[row + 1]
        want = expected[row, token].item()  # a template token top-k ruled out: -9999 (vLLM)
        assert e.logprob == (-9999.0 if want == float("-inf") else pytest.approx(want, abs=2e-4))
        top = e.top_logprobs
        assert len(top) == 5
        assert [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)
        want = expected[row].topk(5)
        assert [t.logprob for t in top] == pytest.approx(want.values.tolist(), abs=2e-4)
        if temperature == 0 and row >= num_template:  # greedy: a sampled token is the top one
            assert bytes(top[0].bytes) == bytes(e.bytes) and top[0].logprob == e.logprob
        if top_k == 5:  # the five survivors carry all the mass
            assert sum(2.718281828 ** t.logprob for t in top) == pytest.approx(1.0, abs=1e-4)


def test_completion_logprobs_and_path_logprobs(served, llm):
    base, _ = served  # llm: a second LLM, not the server's
    prompt = llm.format_prompt(QUESTION)
    r = client(base).completions.create(model=MODEL, prompt=prompt, temperature=0, logprobs=3,
                                        extra_body={"parallel": SMALL, "path_logprobs": True})
    (ref,) = llm.generate([QUESTION], params(temperature=0))
    c = r.choices[0]
    assert c.text == ref.summary.text
    lp = c.logprobs
    ids = ref.summary.token_ids[1:len(ref.summary.token_ids) - (ref.summary.finish_reason == "end")]
    assert lp.tokens == [llm.tokenizer.decode([t], skip_special_tokens=False) for t in ids]
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    num_template = len(llm.summary_template_ids) - 1
    for i, (token, chosen, top) in enumerate(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs)):
        assert top[token] == chosen and 3 <= len(top) <= 4  # the 3 best and the chosen token
        if i >= num_template:
            assert max(top.values()) == chosen  # greedy (a forced template token need not be)
    for path in c.model_extra["paths"]:
        content = path["logprobs"]["content"]
        joined = b"".join(bytes(e["bytes"]) for e in content)
        assert joined.decode("utf-8", errors="replace") == path["text"]
        for e in content:
            assert e["top_logprobs"][0]["logprob"] == e["logprob"] <= 0
