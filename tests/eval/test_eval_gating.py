"""Issue 23 in eval: --stop-on-agreement / --prune-confidence as run dimensions (paired seeds, keys,
resume), path confidences in records with DeepConf's confidence-weighted vote, and the report's
tokens per problem next to accuracy and its accuracy-vs-tokens plot."""

from __future__ import annotations

from pathlib import Path

import pytest

from parathinker.engine.outputs import PathOutput, RequestOutput, SummaryOutput
from parathinker.eval.cli import add_eval_args, config_from_args
from parathinker.eval.config import EvalConfig, Gate
from parathinker.eval.grade import majority_vote
from parathinker.eval.plan import Unit, plan, request_params
from parathinker.eval.records import build_record
from parathinker.eval.report import config_label, pareto_front, render_markdown, summarize, write_report
from parathinker.eval.results import SampleStore, sample_key

PROBLEMS = {"b": [{"id": "q1", "problem": "?", "answer": "3"}, {"id": "q2", "problem": "?", "answer": "5"}]}


def _cfg(**kw) -> EvalConfig:
    return EvalConfig(model="m", output="o", benchmarks=("b",), **kw)


def test_gates_are_run_dimensions_with_the_ungated_samples_seeds() -> None:
    cfg = _cfg(paths=(2, 4), stop_on_agreement=(0, 3), prune_confidence=(None, 1.5), confidence_window=8)
    units = plan(cfg, PROBLEMS)
    # P=2 cannot agree on 3 answers: its agree=3 gates are not run; P=4 runs all four pairs
    gates = {n: [u.gate for u in units if u.num_paths == n and u.problem["id"] == "q1"] for n in (2, 4)}
    assert gates[2] == [Gate(0, None), Gate(0, 1.5)]
    assert gates[4] == [Gate(0, None), Gate(0, 1.5), Gate(3, None), Gate(3, 1.5)]
    assert len({u.key for u in units}) == len(units) == 2 * 2 + 4 * 2
    p4 = [u for u in units if u.num_paths == 4 and u.problem["id"] == "q2"]
    assert len({u.seed(0) for u in p4}) == 1  # every gate of a sample draws from the same seed
    params = {u.gate: request_params(cfg, u)[0] for u in p4}
    assert (params[Gate(3, 1.5)].stop_on_agreement, params[Gate(3, 1.5)].prune_confidence) == (3, 1.5)
    assert params[Gate(0, None)].prune_confidence is None and params[Gate(0, None)].stop_on_agreement == 0
    assert all(p.confidence_window == 8 and p.confidence_top_k == 20 for p in params.values())


def test_gating_flags_parse_and_bad_values_are_clear_errors() -> None:
    import argparse

    p = argparse.ArgumentParser()
    add_eval_args(p)
    args = p.parse_args(["--model", "m", "--output", "o", "--paths", "8", "--stop-on-agreement", "0,2",
                         "--prune-confidence", "none,1.25", "--confidence-window", "16",
                         "--confidence-top-k", "5"])
    cfg = config_from_args(args)
    assert (cfg.stop_on_agreement, cfg.prune_confidence) == ((0, 2), (None, 1.25))
    assert (cfg.confidence_window, cfg.confidence_top_k) == (16, 5)
    with pytest.raises(SystemExit):
        p.parse_args(["--model", "m", "--output", "o", "--prune-confidence", "nan"])
    with pytest.raises(ValueError, match="--prune-confidence needs --confidence-window"):
        _cfg(prune_confidence=(1.0,))
    with pytest.raises(ValueError, match="--stop-on-agreement 9 needs that many paths"):
        _cfg(paths=(2, 8), stop_on_agreement=(9,))
    with pytest.raises(ValueError, match="--confidence-top-k must be >= 1"):
        _cfg(confidence_top_k=0)


def test_the_reference_layout_refuses_gating_before_any_sample_runs() -> None:
    """SPEC §6 has no gating: refused with the flags, not after the native half has run."""
    for gating in ({"stop_on_agreement": (0, 2)}, {"confidence_window": 8},
                   {"confidence_window": 8, "prune_confidence": (None, 1.5)}):
        with pytest.raises(ValueError, match="--layout reference with .*not supported in the "
                                             "reference layout"):
            _cfg(paths=(2, 4), layouts=("native", "reference"), **gating)
        _cfg(paths=(2, 4), layouts=("native",), **gating)  # the native layout gates
    _cfg(paths=(2, 4), layouts=("native", "reference"))  # ungated: both layouts run
    # a --stop-on-agreement no configuration runs (above every P) is an error of its own
    with pytest.raises(ValueError, match="needs that many paths"):
        _cfg(paths=(2,), layouts=("reference",), stop_on_agreement=(3,))


def test_settings_name_the_gate_only_when_gating_is_on() -> None:
    cfg = _cfg(paths=(4,))
    assert "stop_on_agreement" not in cfg.settings("parathinker", 4)  # an old run resumes as before
    gated = _cfg(paths=(4,), confidence_window=8).settings("parathinker", 4, Gate(2, 0.5))
    assert {k: gated[k] for k in ("confidence_window", "confidence_top_k", "stop_on_agreement",
                                  "prune_confidence")} == {"confidence_window": 8, "confidence_top_k": 20,
                                                           "stop_on_agreement": 2, "prune_confidence": 0.5}


def test_confidence_weighted_vote() -> None:
    answers = ["3", "3", "5", None]
    assert majority_vote(answers, use_grader=False) == "3"  # two votes against one
    # DeepConf: each answer votes with its path's confidence, 0.4 + 0.5 < 1.2
    assert majority_vote(answers, use_grader=False, weights=[0.4, 0.5, 1.2, 9.0]) == "5"
    assert majority_vote(answers, use_grader=False, weights=[0.7, 0.6, 1.2, 9.0]) == "3"
    assert majority_vote(answers, use_grader=False, weights=[None, None, None, 9.0]) is None
    with pytest.raises(ValueError, match="2 weights for 4 answers"):
        majority_vote(answers, weights=[1.0, 1.0])


def _output(paths: list[tuple[str, int, str, float | None]], summary: str, summary_len: int = 9
            ) -> RequestOutput:
    outs = [PathOutput(k + 1, list(range(n)), text, reason, confidence=c)
            for k, (text, n, reason, c) in enumerate(paths)]
    return RequestOutput([1] * 30, outs, SummaryOutput(list(range(summary_len)), summary, "end"), None,
                         {"latency_s": 0.5})


def test_records_keep_confidences_and_the_weighted_vote_across_a_resume(tmp_path: Path) -> None:
    cfg = _cfg(paths=(3,), stop_on_agreement=(0, 2), confidence_window=4)
    unit = Unit("b", PROBLEMS["b"][0], "parathinker", 3, 0, gate=Gate(2, None))
    out = _output([("\\boxed{5}", 6, "end", 0.9), ("\\boxed{3}", 5, "end", 2.5), ("x \\boxed{5", 4, "cut", 1.0)],
                  "\\boxed{3}")
    r = build_record(cfg, unit, [out])
    assert r["path_confidences"] == [0.9, 2.5, 1.0]
    # path majority: "5" once and "3" once (the third has no closed box): a tie to the first, wrong
    assert (r["majority_answer"], r["majority_over_paths_correct"]) == ("5", False)
    assert (r["confidence_majority_answer"], r["confidence_majority_correct"]) == ("3", True)
    assert (r["stop_on_agreement"], r["prune_confidence"]) == (2, None)
    assert r["settings"]["stop_on_agreement"] == 2
    with SampleStore(tmp_path) as store:
        store.append(r)
    with SampleStore(tmp_path) as store:  # a resumed run reads them back, under the gated key
        (back,) = store.records()
        assert sample_key(back) == unit.key and back["path_confidences"] == [0.9, 2.5, 1.0]
        assert unit.key in store.done_keys()
        assert Unit("b", PROBLEMS["b"][0], "parathinker", 3, 0).key not in store.done_keys()
    # no confidences (window 0): neither field
    plain = build_record(_cfg(paths=(3,)), Unit("b", PROBLEMS["b"][0], "parathinker", 3, 0),
                         [_output([("\\boxed{3}", 6, "end", None)] * 3, "\\boxed{3}")])
    assert "path_confidences" not in plain and "confidence_majority_correct" not in plain


def _rec(qid: str, gate: tuple[int, float | None], correct: bool, paths: list[int], summary: int,
         weighted: bool | None = None) -> dict:
    r = {"benchmark": "b", "mode": "parathinker", "num_paths": 2, "id": qid, "sample": 0, "answer": "1",
         "correct": correct, "majority_over_paths_correct": correct, "any_path_correct": True,
         "path_tokens": paths, "summary_tokens": summary, "total_tokens": sum(paths) + summary,
         "stop_on_agreement": gate[0], "prune_confidence": gate[1]}
    if weighted is not None:
        r["confidence_majority_correct"] = weighted
    return r


def test_report_puts_tokens_per_problem_next_to_accuracy(tmp_path: Path) -> None:
    records = [_rec("q1", (0, None), True, [40, 30], 10, True), _rec("q2", (0, None), False, [40, 40], 10, True),
               _rec("q1", (2, None), True, [20, 10], 8), _rec("q2", (2, None), True, [30, 10], 8),
               _rec("q1", (0, 0.5), False, [5, 5], 4)]
    summary = summarize(records)["b"]
    assert list(summary) == ["P=2", "P=2 prune<0.5", "P=2 agree=2"]
    assert config_label("parathinker", 8, "reference", (3, 1.25)) == "P=8 agree=3 prune<1.25 (reference)"
    ungated, agree = summary["P=2"], summary["P=2 agree=2"]
    # per problem: paths summed, then averaged over problems (q1 70, q2 80; 30, 40)
    assert ungated["tokens_per_problem"] == {"paths": 75.0, "summary": 10.0, "total": 85.0}
    assert agree["tokens_per_problem"] == {"paths": 35.0, "summary": 8.0, "total": 43.0}
    assert (agree["accuracy"], agree["stop_on_agreement"], agree["prune_confidence"]) == (1.0, 2, None)
    assert "stop_on_agreement" not in ungated
    assert ungated["confidence_majority_accuracy"] == 1.0 and "confidence_majority_accuracy" not in agree
    md = render_markdown({"b": summary}, {})
    assert "| b | P=2 agree=2 | 100.0 ± 0.0 | 100.0 ± 0.0 | – | 35.0 | 8.0 | 43.0 |" in md
    assert "| b | P=2 | 50.0 ± 50.0 | 50.0 ± 50.0 | 100.0 ± 0.0 | 75.0 | 10.0 | 85.0 |" in md
    assert "## Confidence-weighted majority over paths" in md
    write_report({"b": summary}, {}, tmp_path)
    assert (tmp_path / "accuracy_vs_tokens.png").stat().st_size > 1000
    write_report(summarize(records[:2]), {}, tmp_path / "ungated")  # no gate: no tokens plot
    assert not (tmp_path / "ungated" / "accuracy_vs_tokens.png").exists()


def test_pareto_front() -> None:
    # (tokens, accuracy): the second costs more for less; the fourth ties the first's accuracy at a
    # higher cost; the third and fifth each buy accuracy with tokens
    points = [(100.0, 50.0), (120.0, 40.0), (150.0, 60.0), (130.0, 50.0), (300.0, 70.0), (50.0, 10.0)]
    assert pareto_front(points) == [5, 0, 2, 4]
