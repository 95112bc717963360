"""Generation follows SPEC §5: checked token for token against the naive oracle, and for KV reuse."""

from collections import Counter

import pytest
import torch

from tests.oracle import oracle_generate
from parathinker import SamplingParams
from parathinker.engine.slow_twin import generate_request

QUESTIONS = ["What is 2+3?", "Find x if 2x + 3 = 11.", "Let me check 7*3 mod 10."]


def greedy(**kw):
    base = dict(max_path_tokens=16, max_summary_tokens=84, temperature=0.0)
    base.update(kw)
    return SamplingParams(**base)


CASES = [
    dict(num_paths=1),
    dict(num_paths=2),
    dict(num_paths=4),
    dict(num_paths=4, min_finished_paths=4),
    dict(num_paths=3, min_finished_paths=2, min_path_tokens=6),
    dict(num_paths=4, min_finished_paths=4, max_path_tokens=2),
    dict(num_paths=2, min_path_tokens=16),
    dict(num_paths=2, max_summary_tokens=70),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_greedy_matches_naive_oracle(llm, case):
    params = greedy(**case)
    seen = set()
    for q in QUESTIONS[:2]:
        (out,) = llm.generate([q], params)
        paths, reasons, summary, summary_reason = oracle_generate(
            llm.model, llm.ctrl, out.prompt_token_ids, llm.summary_template_ids, params.num_paths,
            params.max_path_tokens, params.min_path_tokens, params.max_summary_tokens,
            params.min_finished_paths)
        assert [p.token_ids for p in out.paths] == paths
        assert [p.finish_reason for p in out.paths] == reasons
        assert out.summary.token_ids == summary
        assert out.summary.finish_reason == summary_reason
        seen.update(reasons)
    if case.get("max_path_tokens") == 2:
        assert seen == {"budget"}


def test_oracle_cases_cover_every_finish_reason(llm):
    """The parametrized oracle cases are only meaningful if the tiny model exercises all rules."""
    reasons = set()
    for case in CASES:
        (out,) = llm.generate([QUESTIONS[0]], greedy(**case))
        reasons.update(p.finish_reason for p in out.paths)
        reasons.add("summary-" + out.summary.finish_reason)
    assert {"end", "budget", "cut", "summary-end", "summary-budget"} <= reasons


def test_paths_are_well_formed(llm):
    params = greedy(num_paths=4, max_path_tokens=12, min_finished_paths=1)
    (out,) = llm.generate(QUESTIONS[:1], params)
    ctrl = llm.ctrl
    for k, p in enumerate(out.paths, start=1):
        assert p.index == k
        assert p.token_ids[0] == ctrl.think_open[k - 1] and p.token_ids[-1] == ctrl.think_close[k - 1]
        assert 2 <= len(p.token_ids) <= params.max_path_tokens
        inner = p.token_ids[1:-1]
        assert not set(inner) & set(ctrl.path_banned_ids() + ctrl.path_end_ids())
    assert out.summary.token_ids[: len(llm.summary_template_ids)] == llm.summary_template_ids
    assert len(out.summary.token_ids) <= params.max_summary_tokens


def test_min_path_tokens_fixes_lengths(llm):
    params = greedy(num_paths=4, max_path_tokens=10, min_path_tokens=10, min_finished_paths=4)
    (out,) = llm.generate(QUESTIONS[:1], params)
    assert [len(p.token_ids) for p in out.paths] == [10] * 4
    assert {p.finish_reason for p in out.paths} == {"budget"}


def test_forward_count_proves_kv_reuse(llm):
    """Prompt once, every path token once, then only the summary (its last token is never fed)."""
    for case in CASES[:5]:
        params = greedy(**case)
        (out,) = llm.generate(QUESTIONS[:1], params)
        expected = (len(out.prompt_token_ids) + sum(len(p.token_ids) for p in out.paths)
                    + len(out.summary.token_ids) - 1)
        assert out.metrics["num_forward_tokens"] == expected


@pytest.mark.parametrize("engine", [True, False], ids=["engine", "slow_twin"])
def test_forward_hook_sees_every_token_once(llm, engine):
    """Capture the token ids that actually enter the model: the prompt once, every path token
    once, the summary template in a single forward, then one summary token per forward."""
    calls = []
    hook = llm.model.model.embed_tokens.register_forward_hook(
        lambda mod, args, out: calls.append(args[0].flatten().tolist()))
    run = llm.generate if engine else llm.generate_slow_twin
    try:
        (out,) = run(QUESTIONS[:1], greedy(num_paths=3, min_finished_paths=3))
    finally:
        hook.remove()
    fed = [t for c in calls for t in c]
    expected = (out.prompt_token_ids + [t for p in out.paths for t in p.token_ids]
                + out.summary.token_ids[:-1])
    assert Counter(fed) == Counter(expected)
    template = llm.summary_template_ids
    (with_template,) = [i for i, c in enumerate(calls) if c[-len(template):] == template]
    generated = out.summary.token_ids[len(template):-1]
    assert calls[with_template + 1:] == [[t] for t in generated]


def test_same_seed_same_output(llm):
    params = SamplingParams(num_paths=3, max_path_tokens=14, max_summary_tokens=84,
                            temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    a = llm.generate(QUESTIONS[:2], params)
    b = llm.generate(QUESTIONS[:2], params)
    assert [o.to_dict() | {"metrics": 0} for o in a] == [o.to_dict() | {"metrics": 0} for o in b]
    c = llm.generate(QUESTIONS[:2], SamplingParams(**{**params.__dict__, "seed": 99}))
    assert [p.token_ids for p in c[0].paths] != [p.token_ids for p in a[0].paths]


def test_sampling_respects_rules(llm):
    params = SamplingParams(num_paths=4, max_path_tokens=12, max_summary_tokens=84,
                            temperature=1.5, seed=7)
    for out in llm.generate(QUESTIONS, params):
        for p in out.paths:
            assert not set(p.token_ids[1:-1]) & set(llm.ctrl.path_banned_ids() + llm.ctrl.path_end_ids())
        body = out.summary.token_ids[len(llm.summary_template_ids):]
        assert not set(body) & set(llm.ctrl.summary_banned_ids())


def test_top_k_one_is_greedy(llm):
    sampled = llm.generate(QUESTIONS[:1], SamplingParams(num_paths=2, max_path_tokens=12,
                           max_summary_tokens=84, temperature=1.0, top_k=1, seed=3))[0]
    greedy_out = llm.generate(QUESTIONS[:1], greedy(num_paths=2, max_path_tokens=12))[0]
    assert [p.token_ids for p in sampled.paths] == [p.token_ids for p in greedy_out.paths]
    assert sampled.summary.token_ids == greedy_out.summary.token_ids


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs(ckpt_dir, dtype):
    from parathinker import LLM

    llm = LLM(str(ckpt_dir), device="cpu", dtype=str(dtype).removeprefix("torch."))
    (out,) = llm.generate(QUESTIONS[:1], greedy(num_paths=2, max_path_tokens=8))
    assert llm.model.lm_head.weight.dtype == dtype
    assert len(out.paths) == 2 and out.summary.token_ids


def test_answer_is_last_boxed_of_summary(llm):
    from parathinker.engine.slow_twin import RawRequestOutput

    tok = llm.tokenizer
    body = tok.encode(" 3, or rather \\boxed{4} and finally \\boxed{\\frac{1}{2}}.", add_special_tokens=False)
    raw = RawRequestOutput([[llm.ctrl.think_open[0], llm.ctrl.think_close[0]]], ["end"],
                           llm.summary_template_ids + body + [llm.ctrl.summary_close], "end")
    out = llm.to_output([1, 2], raw, 1.0)
    assert out.answer == "\\frac{1}{2}"
    assert out.summary.text.endswith("\\boxed{\\frac{1}{2}}.")
