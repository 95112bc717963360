"""layout="reference" (SPEC §6): the rules against hand-written cases from REFERENCE §3.3-§5, and
the engine against a naive full-recompute oracle of the reference engine, token for token."""

import pytest
from tests.oracle_reference import oracle_reference_generate
from parathinker.testing.checkpoints import make_checkpoint

from parathinker import LLM, SamplingParams
from parathinker.engine import Engine
from parathinker.spec.reference_layout import (BUDGET, END, ReferenceTokens, check_params, check_path,
                                          is_thinking_over, pad_prompt, padded_prompt_len,
                                          path_text_ids, path_token, reference_layout, summary_cap,
                                          summary_end, summary_first_position, summary_token)
from parathinker.spec.tokens import DEFAULT_SUMMARY_TEMPLATE, ControlTokens

QUESTIONS = ["What is 2+3?", "Find x if 2x + 3 = 11.", "Let me check 7*3 mod 10.", "abc", "Sum 1..10"]
# A short prompt keeps the oracle's full recomputes cheap (padded to 16 or 32 tokens).
PROMPT = "<｜User｜>{question}<｜Assistant｜><think>"

# Hand-made ids for the pure rules: <think k> = 10 + 2(k-1), </think k> = <think k> + 1.
CTRL = ControlTokens(think_open=(10, 12, 14, 16), think_close=(11, 13, 15, 17), summary_open=30,
                     summary_close=31, eos=2, pad=40, base_think_open=50, base_think_close=51)
TOK = ReferenceTokens.from_ctrl(CTRL)


# ----- pure rules
def test_stop_ids_are_the_newest_examples():
    assert TOK.stop_ids == {51, 11, 13, 15, 17, 31}  # </think>, </think1..>, </summary>; no EOS
    assert TOK.think == 50 and TOK.pad == 40


def test_prompt_padding_is_double_bos_then_pads_to_16():
    bos = 0
    five = [bos, 1, 2, 3, 4]  # encoded with its BOS: the re-encode adds one more
    assert pad_prompt(five, bos, 40) == [0, 0, 1, 2, 3, 4] + [40] * 10
    fifteen = [bos] + list(range(1, 15))
    assert pad_prompt(fifteen, bos, 40) == [0] + fifteen  # (15 + 1) % 16 == 0: no pad
    sixteen = [bos] + list(range(1, 16))
    assert pad_prompt(sixteen, bos, 40) == [0] + sixteen + [40] * 15
    assert pad_prompt([1, 2, 3, 4, 5], None, 40, block_size=4) == [1, 2, 3, 4, 5, 40, 40, 40]
    assert [padded_prompt_len(n, True) for n in (5, 15, 16, 31)] == [16, 16, 32, 32]


def test_worked_example_of_reference_3_3():
    """REFERENCE §3.3 with block size 4: prompt of 5 tokens + 3 pads; path 1 (A) ends at length
    4, path 2 (B) at 2 and path 3 (C) at 3; all are detected finished at the same step, L = 4;
    the summary starts at 2·8 + 4 = 20."""
    a1, a2, c1 = 100, 101, 102
    prompt = pad_prompt([1, 2, 3, 4, 5], None, TOK.pad, block_size=4)
    assert len(prompt) == 8
    # what each path samples at each step (stop ids of several kinds, rewritten to its own)
    script = [{0: a1, 1: 51, 2: c1}, {0: a2, 1: 7, 2: 31}, {0: 11, 1: 8, 2: 9}, {0: 5, 1: 5, 2: 5}]
    paths = [[t] for t in CTRL.think_open[:3]]
    finish, padding = [None] * 3, [False] * 3
    for step in script:
        for k in range(3):
            finish[k], padding[k] = check_path(len(paths[k]), paths[k][-1], padding[k], 16, TOK,
                                               block_size=4)
        if is_thinking_over(sum(f is not None for f in finish), 3):
            break
        for k, c in step.items():
            paths[k].append(path_token(c, k + 1, padding[k], TOK))
    else:
        pytest.fail("thinking never ended")
    assert paths == [[10, a1, a2, 11], [12, 13, 40, 40], [14, c1, 15, 40]]
    assert finish == [END, END, END]
    assert summary_first_position(len(prompt), 4) == 20
    lay = reference_layout(8, 3, 4, 3)
    assert lay.positions == list(range(8)) + [8, 9, 10, 11] * 3 + [20, 21, 22]
    assert lay.segment_ids == [0] * 8 + [1] * 4 + [2] * 4 + [3] * 4 + [0] * 3
    assert [path_text_ids(p, CTRL.think_close[k]) for k, p in enumerate(paths)] == \
        [[a1, a2], [], [c1]]


def test_path_rules():
    # pass 2: <think j> / <summary> -> <think>; any stop -> own end tag; EOS and pad are kept
    assert [path_token(t, 2, False, TOK) for t in (10, 16, 30, 50)] == [50, 50, 50, 50]
    assert [path_token(t, 2, False, TOK) for t in (51, 11, 17, 31, 13)] == [13] * 5
    assert [path_token(t, 2, False, TOK) for t in (2, 40, 99)] == [2, 40, 99]
    assert [path_token(t, 2, True, TOK) for t in (99, 13, 2)] == [40, 40, 40]
    # pass 1: the stop checker
    assert check_path(16, 13, False, 48, TOK) == (END, False)
    assert check_path(5, 13, False, 48, TOK) == (None, True)
    assert check_path(9, 40, True, 48, TOK) == (None, True)
    assert check_path(32, 40, True, 48, TOK) == (END, False)
    assert check_path(48, 99, False, 48, TOK) == (BUDGET, False)
    assert check_path(16, 2, False, 48, TOK) == (None, False)  # EOS is not a stop
    assert check_path(48, 13, False, 48, TOK) == (END, False)
    # first-finish: one finished path ends thinking for P <= 10
    assert all(is_thinking_over(1, p) and not is_thinking_over(0, p) for p in range(1, 11))


def test_summary_rules():
    template = [30, 60, 61, 62]
    assert [summary_token(template, n, 99) for n in range(1, 6)] == [60, 61, 62, 99, 99]
    assert summary_end(99, 5, 128, TOK) == (99, None)
    assert summary_end(2, 5, 128, TOK) == (2, None)  # EOS is not a stop
    assert [summary_end(t, 5, 128, TOK) for t in (31, 51, 13)] == [(31, END)] * 3
    assert summary_end(99, 128, 128, TOK) == (99, BUDGET)
    assert summary_end(31, 128, 128, TOK) == (31, END)
    assert [summary_cap(n) for n in (1024, 128, 40)] == [128, 128, 40]


def test_params_the_reference_cannot_run_are_refused():
    check_params(4, 48, 0, 1, 1024, 20)
    for args, word in [((4, 40, 0, 1, 1024, 20), "multiple of 16"), ((11, 48, 0, 1, 1024, 20), "10"),
                       ((4, 48, 0, 2, 1024, 20), "first-finish"), ((4, 48, 3, 1, 1024, 20), "mask"),
                       ((4, 48, 0, 1, 1024, 128), "template")]:
        with pytest.raises(ValueError, match=word):
            check_params(*args)


# ----- the engine against the oracle
def ckpt(tmp_path_factory, tokenizer, name, **kw):
    return make_checkpoint(tmp_path_factory.mktemp(name), tokenizer=tokenizer, **kw)


def reference_llm(path, **kw):
    return LLM(str(path), device="cpu", dtype="float32", layout="reference", prompt_template=PROMPT,
               **kw)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, tokenizer):
    """Paths end at different lengths: some end and pad, others are cut (L = 16 or 32);
    summaries run to the 128-token cap."""
    return reference_llm(ckpt(tmp_path_factory, tokenizer, "mixed", end_boost=0.9, seed=0))


def oracle(llm, question, p, **kw):
    return oracle_reference_generate(llm.model, llm.tokenizer, llm.format_prompt(question),
                                     llm.summary_template, p.num_paths, p.max_path_tokens,
                                     summary_cap(p.max_summary_tokens), **kw)


def same_as_oracle(llm, out, question, p):
    prompt, paths, reasons, summary, summary_reason = oracle(llm, question, p)
    assert out.error is None
    assert out.prompt_token_ids == prompt
    assert [o.token_ids for o in out.paths] == paths
    assert [o.finish_reason for o in out.paths] == reasons
    assert out.summary.token_ids == summary
    assert out.summary.finish_reason == summary_reason


def greedy(**kw):
    base = dict(num_paths=4, max_path_tokens=48, temperature=0.0)
    base.update(kw)
    return SamplingParams(**base)


def test_batched_requests_match_the_oracle_with_pads_and_truncation(mixed):
    p = greedy()
    outs = mixed.generate(QUESTIONS, p)
    for out, q in zip(outs, QUESTIONS):
        same_as_oracle(mixed, out, q, p)
    pad, bos = mixed.ctrl.pad, mixed.tokenizer.bos_token_id
    for out in outs:
        assert out.prompt_token_ids[:2] == [bos, bos] and len(out.prompt_token_ids) % 16 == 0
        assert len({len(o.token_ids) for o in out.paths}) == 1
        assert len(out.paths[0].token_ids) % 16 == 0
    # some request has a path that ended early and was padded, next to a truncated one
    padded = [(out, o) for out in outs for o in out.paths if o.finish_reason == "end"
              and o.token_ids[-1] == pad and mixed.ctrl.think_close[o.index - 1] in o.token_ids]
    assert padded, "no path ended before the others"
    assert any(any(o.finish_reason == "cut" for o in out.paths) for out, _ in padded)
    for out in outs:
        for o in out.paths:
            close = mixed.ctrl.think_close[o.index - 1]
            assert (close in o.token_ids) == (o.finish_reason == "end")
            if o.finish_reason == "end":  # after the end tag only pads, and none in the text
                i = o.token_ids.index(close)
                assert set(o.token_ids[i + 1:]) <= {pad}
                assert o.text == mixed.tokenizer.decode(o.token_ids[1:i], skip_special_tokens=False)
                assert "<vllm_pad>" not in o.text or pad in o.token_ids[1:i]
    assert mixed.engine.block_manager.num_used == 0


@pytest.fixture(scope="module", params=["runs", "flex"])
def quick(request, tmp_path_factory, tokenizer):
    """Paths end within 16 or 32 tokens, summaries end with </summary>; the engine's own KV
    blocks (4 tokens) differ from the reference's 16. Through both in-place backends."""
    return reference_llm(ckpt(tmp_path_factory, tokenizer, "quick", end_boost=1.0, seed=2),
                         block_size=4, attention=request.param)


def test_one_path_and_several_in_one_batch(quick):
    """P = 1 (which the released engine cannot run) beside P = 2 and 3, in one engine."""
    configs = [greedy(num_paths=n, max_path_tokens=32, max_summary_tokens=100) for n in (1, 3, 2, 1)]
    engine = quick.engine
    ids = quick.encode_prompts(QUESTIONS[:4], None)
    reqs = [engine.add_request(f"ref-{i}", quick.engine_prompt(x), p)
            for i, (x, p) in enumerate(zip(ids, configs))]
    engine.run_to_completion()
    for req, q, p in zip(reqs, QUESTIONS, configs):
        same_as_oracle(quick, quick.request_output(req), q, p)
    assert any(quick.request_output(r).summary.finish_reason == "end" for r in reqs)


def test_paths_that_never_end_stop_at_max_path_tokens(tmp_path_factory, tokenizer):
    llm = reference_llm(ckpt(tmp_path_factory, tokenizer, "long", end_boost=0.8, seed=0))
    p = greedy(num_paths=2, max_path_tokens=32, max_summary_tokens=80)
    (out,) = llm.generate(QUESTIONS[:1], p)
    same_as_oracle(llm, out, QUESTIONS[0], p)
    assert [o.finish_reason for o in out.paths] == ["budget", "budget"]
    assert [len(o.token_ids) for o in out.paths] == [32, 32]
    assert out.summary.finish_reason == "budget" and len(out.summary.token_ids) == 80


def test_the_summary_template_takes_one_step_per_token(quick):
    """L path steps (the last one ends thinking), then one step per summary token but the last."""
    p = greedy(num_paths=2, max_path_tokens=32)
    before = quick.engine.num_steps
    (out,) = quick.generate(QUESTIONS[:1], p)
    path_len, summary_len = len(out.paths[0].token_ids), len(out.summary.token_ids)
    template = quick.tokenizer.encode(DEFAULT_SUMMARY_TEMPLATE, add_special_tokens=False)
    assert out.summary.token_ids[:len(template)] == template
    assert quick.engine.num_steps - before == path_len + summary_len - 1


def test_the_oracle_notices_a_summary_at_native_positions(mixed):
    """The comparison is sensitive to the 2·Lp + L offset: at Lp + L the summary differs."""
    p = greedy()
    (out,) = mixed.generate(QUESTIONS[1:2], p)
    lp, path_len = len(out.prompt_token_ids), len(out.paths[0].token_ids)
    shifted = oracle(mixed, QUESTIONS[1], p, summary_offset=lp + path_len)[3]
    assert shifted != out.summary.token_ids


def test_validation_and_the_engine_boundary(quick):
    for bad in (dict(max_path_tokens=40), dict(min_finished_paths=2), dict(min_path_tokens=4)):
        with pytest.raises(ValueError, match="layout='reference'"):
            quick.generate(QUESTIONS[:1], greedy(**bad))
        with pytest.raises(ValueError, match="layout='reference'"):
            quick.engine.add_request("bad", [1, 2, 3], greedy(**bad))
    assert "bad" not in quick.engine.requests
    with pytest.raises(ValueError, match="unknown layout"):
        Engine(quick.model, quick.ctrl, [1], layout="vllm")


def test_native_stays_the_default(llm):
    assert llm.layout == "native" and llm.engine.layout == "native"
    (out,) = llm.generate(QUESTIONS[:1], greedy(num_paths=2, max_path_tokens=20,
                                                 max_summary_tokens=80))
    assert llm.ctrl.pad not in out.prompt_token_ids
    assert all(o.token_ids[-1] == llm.ctrl.think_close[o.index - 1] for o in out.paths)


def test_served_reference_layout_runs_the_padded_prompt(quick):
    """`parathinker serve --layout reference`: the server runs what LLM.generate runs (the
    padded prompt of SPEC §6), and usage counts the prompt the engine ran."""
    from parathinker.testing.servers import MODEL, client, collect_stream, running_server

    llm, q = quick, QUESTIONS[1]
    expected = llm.generate([q], greedy(num_paths=2, max_path_tokens=32, max_summary_tokens=100))[0]
    # a path that ends before the other is padded in this layout: pads must not reach the text
    assert any(p.finish_reason == "end" and llm.ctrl.pad in p.token_ids for p in expected.paths)
    kw = dict(model=MODEL, messages=[{"role": "user", "content": q}], temperature=0,
              extra_body={"parallel": {"num_paths": 2, "max_path_tokens": 32,
                                       "max_summary_tokens": 100}})
    with running_server(llm) as url:
        r = client(url).chat.completions.create(**kw)
        streamed = collect_stream(client(url).chat.completions.create(
            stream=True, stream_options={"include_paths": True}, **kw))
        capped = client(url).chat.completions.create(  # budgets from a cap: paths in 16s
            model=MODEL, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=200,
            extra_body={"parallel": {"num_paths": 2}})
    assert capped.usage.completion_tokens <= 200
    assert all(p["num_tokens"] % 16 == 0 for p in capped.choices[0].message.model_extra["paths"])
    assert streamed["reasoning"] == r.choices[0].message.model_extra["reasoning_content"]
    assert streamed["paths"] == {p.index: p.text for p in expected.paths if p.text}
    assert streamed["content"] == expected.summary.text
    assert r.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert r.usage.prompt_tokens % 16 == 0
    paths = r.choices[0].message.model_extra["paths"]
    assert [p["text"] for p in paths] == [p.text for p in expected.paths]
    assert r.choices[0].message.content == expected.summary.text
    with pytest.raises(ValueError, match="slow twin of the native layout"):
        llm.generate_slow_twin([q])
