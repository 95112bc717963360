"""Gated parallel thinking (issue 23): per-path confidence, pruning, stopping on agreement.

The expected values are computed here from the outside: token confidences from the engine's own
`logprobs` output (top log-probabilities of an ungated run with the same seed, -inf reported
entries floored at -9999.0, the value the server reports) by DeepConf's formula written again
below; the engine and its slow twin are compared token for token on gated requests, alone, in a
batch with ungated ones and after preemption."""

import math
import random
from collections import Counter
from dataclasses import replace

import pytest

from parathinker import LLM, SamplingParams
from parathinker.engine.confidence import to_prune
from parathinker.engine.slow_twin import generate_request
from parathinker.spec.answers import normalize_answer
from tests import ROOT
from tests.engine.test_engine import same

FLOOR = -9999.0  # what the server reports for -inf (vLLM's value), typed in from serve/choices.py
QUESTIONS = ["What is 2+3?", "Find x if 2x + 3 = 11.", "Let me check 7*3 mod 10.", "abc"]
DEMO_MODEL = ROOT / "docs" / "demo" / "model"
TEMPLATE = "<summary>The final answer is"  # short: these tests are about the paths


def params(**kw):
    base = dict(num_paths=4, max_path_tokens=34, min_path_tokens=22, min_finished_paths=4,
                max_summary_tokens=12, temperature=0.0, confidence_window=16)
    return SamplingParams(**(base | kw))


def fake_answer(text_ids):
    """A stand-in answer for the random tiny model (which writes no \\boxed{}): the last text
    token's residue mod 3, so that paths agree now and then."""
    return str(text_ids[-1] % 3) if text_ids else None


@pytest.fixture(scope="module")
def gate_llm(ckpt_dir):
    llm = LLM(str(ckpt_dir), device="cpu", dtype="float32", summary_template=TEMPLATE)
    llm.engine.answer_of = fake_answer
    return llm


def run(llm, questions, p, logprobs=None):
    ids = llm.encode_prompts(questions, None)
    reqs = [llm.engine.add_request(f"g{random.random()}", i, p, logprobs=logprobs,
                                   path_logprobs=logprobs is not None) for i in ids]
    llm.engine.run_to_completion()
    return [llm.request_output(r) for r in reqs]


def twin(llm, question, p, answer_of=fake_answer):
    ids = llm.encode_prompts([question], None)[0]
    raw = generate_request(llm.model, llm.ctrl, ids, llm.summary_template_ids, p,
                           answer_of=answer_of)
    return llm.to_output(ids, raw, 0.0)


def same_gated(a, b):
    same(a, b)
    for x, y in zip(a.paths, b.paths):
        assert (x.confidence is None) == (y.confidence is None)
        if x.confidence is not None:
            assert x.confidence == pytest.approx(y.confidence, rel=1e-5)


def token_confidences(path, top_k):
    """DeepConf's token confidence of every drawn token that has a logprob entry: -mean of its
    top_k top log-probabilities, each floored. None where the entry is missing (a drawn end
    token other than the path's own tag, rewritten: only ever the last token)."""
    out = []
    for entry in path.logprobs[1:]:  # the opening tag is forced
        if entry is None:
            out.append(None)
            continue
        top = [max(v, FLOOR) for v in entry[2][:top_k]]
        out.append(-sum(top) / len(top))
    return out


def groups(confs, window):
    """(index into confs, group confidence) of every full window."""
    return [(i, math.fsum(confs[i - window + 1:i + 1]) / window)
            for i in range(window - 1, len(confs)) if None not in confs[i - window + 1:i + 1]]


# ----- parameters
@pytest.mark.parametrize("kw, message", [
    (dict(prune_confidence=1.0), "prune_confidence needs confidence_window > 0"),
    (dict(confidence_window=4, prune_confidence=float("inf")), "prune_confidence must be a finite"),
    (dict(confidence_top_k=0), "confidence_top_k must be >= 1"),
    (dict(confidence_window=-1), "confidence_window must be >= 0"),
    (dict(num_paths=4, stop_on_agreement=5), "stop_on_agreement must be in 0..num_paths=4"),
    (dict(stop_on_agreement=-1), "stop_on_agreement must be in 0..num_paths"),
])
def test_bad_gating_params_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kw)


def test_reference_layout_and_an_engine_without_answers_refuse_gating(ckpt_dir, gate_llm):
    ref = LLM(str(ckpt_dir), device="cpu", dtype="float32", layout="reference")
    for p in (SamplingParams(confidence_window=8), SamplingParams(stop_on_agreement=2)):
        with pytest.raises(ValueError, match="not supported in the reference layout"):
            ref.generate(QUESTIONS[:1], p)
        with pytest.raises(ValueError, match="not supported in the reference layout"):
            ref.engine.add_request("r", [1, 2, 3], p)
    gate_llm.engine.answer_of, kept = None, gate_llm.engine.answer_of
    try:
        with pytest.raises(ValueError, match="stop_on_agreement needs answers"):
            gate_llm.engine.add_request("r", [1, 2, 3], SamplingParams(stop_on_agreement=2))
    finally:
        gate_llm.engine.answer_of = kept


def test_the_best_one_stays():
    assert to_prune({0: 1.0, 2: 3.0}, 4) == [0, 2]  # two others are still unpruned
    assert to_prune({0: 1.0, 2: 3.0, 3: 2.0}, 3) == [0, 3]  # the last three: the best stays
    assert to_prune({1: 2.0, 4: 2.0}, 2) == [4]  # a tie keeps the lower index
    assert to_prune({5: 0.5}, 1) == []


# ----- confidence
@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.8, seed=3),
                                      dict(temperature=1.0, top_k=10, seed=5)])
def test_every_path_reports_the_confidence_its_logprobs_give(gate_llm, sampling):
    """window 16: every path has a float confidence, the lowest group confidence of its
    drawn tokens computed here from the engine's own top_logprobs (top_k=10 filters leave -inf
    among the top 20: floored); the slow twin agrees."""
    p = params(**sampling)
    outs = run(gate_llm, QUESTIONS[:2], p, logprobs=p.confidence_top_k)
    for q, out in zip(QUESTIONS, outs):
        same_gated(out, twin(gate_llm, q, p))
        for path in out.paths:
            assert isinstance(path.confidence, float) and math.isfinite(path.confidence)
            confs = token_confidences(path, p.confidence_top_k)
            if None in confs:  # a rewritten end token: its window cannot be recomputed here
                confs = confs[:-1]
                assert path.confidence <= min(g for _, g in groups(confs, 16)) * (1 + 1e-6)
            else:
                assert path.confidence == pytest.approx(min(g for _, g in groups(confs, 16)),
                                                        rel=1e-9)
    if "top_k" in sampling:  # the floor entered: half the top 20 were -inf
        assert all(p.confidence > 4000 for o in outs for p in o.paths)


def test_short_paths_report_the_mean_of_what_they_have(gate_llm):
    p = params(confidence_window=64, max_path_tokens=30, min_path_tokens=0)
    outs = run(gate_llm, QUESTIONS[:2], p, logprobs=20)
    for out in outs:
        for path in out.paths:
            confs = [c for c in token_confidences(path, 20) if c is not None]
            if len(confs) == len(path.token_ids) - 1:  # drawn tokens, all with entries
                assert path.confidence == pytest.approx(sum(confs) / len(confs), rel=1e-9)
    assert all(o.paths[0].confidence is not None for o in outs)
    plain = run(gate_llm, QUESTIONS[:1], replace(p, confidence_window=0))[0]
    assert all(path.confidence is None for path in plain.paths)


# ----- pruning
@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.9, seed=11)])
def test_pruning_at_the_median_closes_paths_where_their_logprobs_say(gate_llm, sampling):
    """The threshold is the median of an ungated run's path confidences; each path is expected
    to close at the first full window below it whose last token did not end the path, found here
    from the ungated run's logprobs; the pruned run's tokens are the ungated ones up to there,
    then the path's end tag."""
    p = params(**sampling)
    close = gate_llm.ctrl.think_close
    pruned_any = 0
    for q in QUESTIONS[:2]:
        (free,) = run(gate_llm, [q], p, logprobs=20)
        c = sorted(x.confidence for x in free.paths)
        threshold = (c[len(c) // 2 - 1] + c[len(c) // 2]) / 2
        (out,) = run(gate_llm, [q], replace(p, prune_confidence=threshold))
        same_gated(out, twin(gate_llm, q, replace(p, prune_confidence=threshold)))
        for k, (a, b) in enumerate(zip(free.paths, out.paths)):
            confs = token_confidences(a, 20)
            ends = len(confs) - 1  # index of the drawn token that ended the path
            hits = [i for i, g in groups(confs, 16) if g < threshold and i != ends]
            if hits:
                i = hits[0]
                assert b.finish_reason == "pruned"
                assert b.token_ids == a.token_ids[:i + 1] + [close[k]]
                assert b.confidence < threshold
                pruned_any += 1
            else:
                assert b.finish_reason == a.finish_reason and b.token_ids == a.token_ids
        assert any(x.finish_reason != "pruned" for x in out.paths)
    assert pruned_any > 0


def test_a_threshold_above_everything_keeps_the_best_path(gate_llm):
    """Every path falls below at its first full window, in the same step: all are pruned but
    the one with the highest group confidence there, which runs on to its own end."""
    p = params(min_path_tokens=24)
    for q in QUESTIONS[:2]:
        (free,) = run(gate_llm, [q], p, logprobs=20)
        first = [groups(token_confidences(x, 20), 16)[0][1] for x in free.paths]
        best = max(range(len(first)), key=lambda k: (first[k], -k))
        (out,) = run(gate_llm, [q], replace(p, prune_confidence=1e6))
        same_gated(out, twin(gate_llm, q, replace(p, prune_confidence=1e6)))
        assert [x.finish_reason == "pruned" for x in out.paths] == \
            [k != best for k in range(len(first))]
        assert out.paths[best].token_ids == free.paths[best].token_ids
        # <think{k}>, 15 drawn tokens, then </think{k}> in place of the 16th
        assert all(len(x.token_ids) == 17 for x in out.paths if x.finish_reason == "pruned")


# ----- agreement
def test_agreement_stops_thinking_as_the_slow_twin_does(gate_llm):
    """stop_on_agreement=2 with every path waited for: the engine equals its twin; every
    request that stopped early holds two ended paths with the same answer; the same seeds
    without the rule give the same tokens up to the cut."""
    p = params(min_path_tokens=0, num_paths=6, min_finished_paths=6, temperature=1.0,
               confidence_window=0)
    early = 0
    for i, q in enumerate(QUESTIONS[:3]):
        seeded = replace(p, seed=i, stop_on_agreement=2)
        (out,) = run(gate_llm, [q], seeded)
        (free,) = run(gate_llm, [q], replace(seeded, stop_on_agreement=0))
        same_gated(out, twin(gate_llm, q, seeded))
        if any(x.finish_reason == "cut" for x in out.paths):
            early += 1
            ended = [fake_answer(x.token_ids[1:-1]) for x in out.paths
                     if x.finish_reason in ("end", "budget")]
            assert max(Counter(ended).values()) >= 2
        for a, b in zip(free.paths, out.paths):
            n = len(b.token_ids) - (b.finish_reason == "cut")
            assert b.token_ids[:n] == a.token_ids[:n]
        assert out.num_path_tokens <= free.num_path_tokens
    assert early > 0


@pytest.mark.skipif(not (DEMO_MODEL / "model.safetensors").exists(), reason="no demo model")
def test_agreement_on_the_demo_model_uses_the_boxed_answers():
    """The real answer rule (LLM.answer_key: last \\boxed{} of the text, normalised): a request
    that stopped early holds two ended paths whose PathOutput.answer agree, and the same seed
    without the rule gives the same tokens up to the cut (the slow twin is compared on agreement
    above, with a stand-in answer: it is slow on 8 paths)."""
    from parathinker.demo.config import DemoConfig
    from parathinker.demo.task import split_problems

    llm = LLM(str(DEMO_MODEL), device="cpu", dtype="float32")
    _, held_out = split_problems(random.Random(0), 99)
    questions = [pr["problem"] for pr in held_out[:8]]
    demo = DemoConfig()  # the demo's own budgets: the Done-when's setting
    p = SamplingParams(num_paths=8, max_path_tokens=demo.max_path_tokens,
                       max_summary_tokens=demo.max_summary_tokens, min_finished_paths=8,
                       temperature=demo.temperature, stop_on_agreement=2)
    ids = llm.encode_prompts(questions, None)
    reqs = [llm.engine.add_request(f"d{i}", x, replace(p, seed=i)) for i, x in enumerate(ids)]
    free = [llm.engine.add_request(f"f{i}", x, replace(p, seed=i, stop_on_agreement=0))
            for i, x in enumerate(ids)]
    llm.engine.run_to_completion()
    early = 0
    for r, f in zip(reqs, free):
        out, full = llm.request_output(r), llm.request_output(f)
        for a, b in zip(full.paths, out.paths):
            n = len(b.token_ids) - (b.finish_reason == "cut")
            assert b.token_ids[:n] == a.token_ids[:n]
        if any(x.finish_reason == "cut" for x in out.paths):
            early += 1
            keys = [normalize_answer(x.answer) for x in out.paths
                    if x.finish_reason in ("end", "budget") and x.answer is not None]
            assert max(Counter(keys).values()) >= 2
    assert early > 0


# ----- batching and preemption
def gated_mix():
    return [params(temperature=0.9, seed=1, prune_confidence=4.74),
            params(temperature=0.0, confidence_top_k=5, confidence_window=8),
            params(temperature=1.0, seed=2, min_path_tokens=0, stop_on_agreement=2,
                   confidence_window=0),
            params(temperature=0.7, seed=4, top_p=0.9, confidence_window=4, prune_confidence=5.0,
                   stop_on_agreement=3, min_path_tokens=10)]


def test_gated_and_ungated_requests_batch_together(gate_llm):
    """Gated requests (different windows, top-k, thresholds) with ungated ones in one batch: each
    gated one's outputs are its outputs alone, which are the slow twin's."""
    gated = gated_mix()
    alone = [run(gate_llm, [q], p)[0] for q, p in zip(QUESTIONS, gated)]
    for q, p, a in zip(QUESTIONS, gated, alone):
        same_gated(a, twin(gate_llm, q, p))
    assert any(x.finish_reason == "pruned" for a in alone for x in a.paths)
    ungated = [params(num_paths=3, min_finished_paths=2, temperature=0.5, seed=9, confidence_window=0),
               params(num_paths=2, min_finished_paths=1, confidence_window=0)]
    engine = gate_llm.engine
    ids = gate_llm.encode_prompts(QUESTIONS, None)
    reqs = [engine.add_request(f"mix-{i}", ids[i], p) for i, p in enumerate(gated)]
    others = [engine.add_request(f"mix-u{i}", ids[i], p) for i, p in enumerate(ungated)]
    engine.run_to_completion()
    for r, a in zip(reqs, alone):
        same_gated(gate_llm.request_output(r), a)
    assert all(r.status == "finished" for r in others)


def test_preemption_does_not_change_gated_outputs(ckpt_dir, gate_llm):
    gated = gated_mix()
    alone = [run(gate_llm, [q], p)[0] for q, p in zip(QUESTIONS, gated)]
    tight = LLM(str(ckpt_dir), device="cpu", dtype="float32", block_size=4, num_kv_blocks=100,
                summary_template=TEMPLATE)
    tight.engine.answer_of = fake_answer
    ids = tight.encode_prompts(QUESTIONS, None)
    reqs = [tight.engine.add_request(f"t{i}", ids[i], p) for i, p in enumerate(gated)]
    reqs += [tight.engine.add_request(f"t{i}b", ids[i], p) for i, p in enumerate(gated)]
    tight.engine.run_to_completion()
    outs = [tight.request_output(r) for r in reqs]
    assert sum(o.metrics["num_preemptions"] for o in outs) > 0, "the pool was meant to be too small"
    for o, a in zip(outs, alone + alone):
        same_gated(o, a)
