"""Tests for parathinker.eval.report: summary math checked by hand, and the written report files."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest

from parathinker.eval.report import config_label, summarize, write_report


def _records() -> list[dict]:
    out = []
    # aime24, P=2: per-problem correct means 0.5, 1, 0; path majority 1, 0.5, 0; any path 1, 1, 0.5
    par = {"q1": ([1, 0], [1, 1], [1, 1]), "q2": ([1, 1], [0, 1], [1, 1]), "q3": ([0, 0], [0, 0], [1, 0])}
    k = 0
    for qid, (correct, majority, oracle) in par.items():
        for s in range(2):
            k += 1
            out.append({"benchmark": "aime24", "mode": "parathinker", "num_paths": 2, "id": qid, "sample": s,
                        "answer": "1", "correct": bool(correct[s]), "majority_over_paths_correct": bool(majority[s]),
                        "any_path_correct": bool(oracle[s]), "total_tokens": 100 * k, "path_tokens": [10, 30],
                        "summary_tokens": 5, "latency_s": float(k)})
    out += [{"benchmark": "aime24", "mode": "sequential", "num_paths": 1, "id": q, "sample": 0, "answer": "1",
             "correct": c, "total_tokens": 50} for q, c in (("q1", True), ("q2", False))]
    out.append({"benchmark": "math500", "mode": "sequential", "num_paths": 1, "id": "m1", "sample": 0,
                "answer": "2", "correct": True})
    out.append({"benchmark": "aime24", "mode": "majority", "num_paths": 8, "id": "q1", "sample": 0,
                "answer": "2", "correct": False})
    return out[::-1]  # input order must not matter


def test_config_label() -> None:
    assert config_label("sequential", 1) == "sequential"
    assert config_label("parathinker", 4) == "P=4"
    assert config_label("majority", 8) == "majority@8"


def test_summary_math() -> None:
    s = summarize(_records())
    assert list(s) == ["aime24", "math500"]
    assert list(s["aime24"]) == ["sequential", "P=2", "majority@8"]
    p2 = s["aime24"]["P=2"]
    assert (p2["num_problems"], p2["num_samples"], p2["mode"], p2["num_paths"]) == (3, 6, "parathinker", 2)
    # per-problem means [0.5, 1, 0]: mean 0.5, sample std 0.5, s.e. 0.5 / sqrt(3)
    assert p2["accuracy"] == pytest.approx(0.5)
    assert p2["accuracy_se"] == pytest.approx(0.5 / math.sqrt(3))
    assert p2["majority_accuracy"] == pytest.approx(0.5)
    assert p2["majority_accuracy_se"] == pytest.approx(0.5 / math.sqrt(3))
    # [1, 1, 0.5]: mean 5/6, sample variance (1/36 + 1/36 + 4/36) / 2 = 1/12
    assert p2["oracle_accuracy"] == pytest.approx(5 / 6)
    assert p2["oracle_accuracy_se"] == pytest.approx(math.sqrt(1 / 12) / math.sqrt(3))
    assert p2["tokens"]["total_tokens"] == pytest.approx({"mean": 350, "p50": 350, "max": 600})
    assert p2["tokens"]["path_tokens"] == pytest.approx({"mean": 20, "p50": 20, "max": 30})  # per path
    assert p2["tokens"]["summary_tokens"] == pytest.approx({"mean": 5, "p50": 5, "max": 5})
    assert p2["latency_s"] == pytest.approx({"mean": 3.5, "p50": 3.5, "p90": 5.5})  # linear interpolation
    seq = s["aime24"]["sequential"]
    assert (seq["accuracy"], seq["accuracy_se"]) == pytest.approx((0.5, 0.5))  # std([1, 0]) = 0.7071 / sqrt(2)
    assert "majority_accuracy" not in seq and "latency_s" not in seq and list(seq["tokens"]) == ["total_tokens"]
    one = s["math500"]["sequential"]
    # n = 1: the sample std (ddof=1) divides by n - 1 = 0: the s.e. is undefined, not 0
    assert (one["accuracy"], one["accuracy_se"], one["num_problems"]) == (1.0, None, 1)


def test_summary_averages_samples_within_problem_first() -> None:
    # q1 has 3 samples (all right), q2 has 1 (wrong): pass@1 = (1 + 0) / 2, not 3 / 4
    recs = [{"benchmark": "b", "mode": "sequential", "num_paths": 1, "id": q, "sample": i, "answer": "", "correct": c}
            for q, i, c in (("q1", 0, True), ("q1", 1, True), ("q1", 2, True), ("q2", 0, False))]
    assert summarize(recs)["b"]["sequential"]["accuracy"] == 0.5


@dataclass(frozen=True)
class _Config:
    model: str = "tiny"
    num_samples: int = 2


def test_write_report(tmp_path: Path) -> None:
    summary = summarize(_records())
    write_report(summary, _Config(), tmp_path / "out")
    out = tmp_path / "out"
    saved = json.loads((out / "summary.json").read_text())
    assert saved["config"] == {"model": "tiny", "num_samples": 2}
    assert saved["summary"]["aime24"]["P=2"]["accuracy"] == pytest.approx(0.5)
    assert saved["summary"]["math500"]["sequential"]["accuracy_se"] is None  # JSON null
    md = (out / "report.md").read_text()
    assert "| benchmark | sequential | P=2 | majority@8 |" in md
    assert "| aime24 | 50.0 ± 50.0 | 50.0 ± 28.9 | 0.0 ± n/a |" in md  # majority@8: one problem
    assert "| math500 | 100.0 ± n/a | – | – |" in md
    assert "| aime24 | 50.0 ± 28.9 |" in md.split("## Majority vote over paths")[1]
    assert "| aime24 | 83.3 ± 16.7 |" in md.split("## Any path correct")[1]
    assert "| aime24 | P=2 | 3 | 6 | 350 / 350 / 600 | 20 / 20 / 30 | 5 / 5 / 5 | 3.50 / 3.50 / 5.50 |" in md
    assert '"model": "tiny"' in md.split("## Configuration")[1]
    png = (out / "accuracy_vs_paths.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_write_report_sequential_only(tmp_path: Path) -> None:
    recs = [{"benchmark": "amc23", "mode": "sequential", "num_paths": 1, "id": "a", "sample": 0, "answer": "1",
             "correct": True}]
    write_report(summarize(recs), {"seed": 0}, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "Majority vote over paths" not in md and "| amc23 | 100.0 ± n/a |" in md
    assert (tmp_path / "accuracy_vs_paths.png").stat().st_size > 0


def test_printed_summary_says_an_undefined_standard_error(capsys) -> None:
    from parathinker.eval.runner import print_table

    print_table(summarize(_records()))
    lines = capsys.readouterr().out.splitlines()
    assert any(ln.endswith("sequential:  100.0 ± n/a (1 problems, 1 samples)") for ln in lines), lines
    assert any("P=2:  50.0 ± 28.9 (3 problems, 6 samples) | majority 50.0 ± 28.9 | oracle 83.3 ± 16.7"
               in ln for ln in lines), lines


def test_report_shows_each_columns_settings_not_only_the_last_invocations(tmp_path: Path) -> None:
    """README's two model-card commands into one output: ParaThinker paths fitted to 603 tokens,
    then the sequential baseline, whose own flags (the last invocation) say 16384."""
    par = {"model": "pt", "backend": "engine", "temperature": 0.5, "top_p": 1.0, "top_k": 0, "base_seed": 0,
           "max_path_tokens": 603, "max_summary_tokens": 1024, "min_finished_paths": 1,
           "rope_scaling": None}
    seq = {"model": "r1", "backend": "engine", "temperature": 0.5, "top_p": 1.0, "top_k": 0, "base_seed": 0,
           "max_tokens": 32768, "rope_scaling": None}
    recs = [{"benchmark": b, "mode": "parathinker", "num_paths": n, "id": "q", "sample": 0, "answer": "1",
             "correct": True, "settings": {**par, "min_finished_paths": 1}} for b in ("aime24", "amc23")
            for n in (2, 4)]
    recs += [{"benchmark": b, "mode": "sequential", "num_paths": 1, "id": "q", "sample": 0, "answer": "1",
              "correct": False, "settings": {**seq, "max_tokens": m}} for b, m in (("aime24", 32768),
                                                                                    ("amc23", 30000))]
    write_report(summarize(recs), {"config": {"max_path_tokens": 16384, "modes": ["sequential"]}}, tmp_path)
    md = (tmp_path / "report.md").read_text()
    table = md.split("## Settings of each configuration")[1].split("\n## ")[0]
    assert "| setting | sequential | P=2 | P=4 |" in table
    assert "| max_path_tokens | – | 603 | 603 |" in table
    assert "| model | r1 | pt | pt |" in table
    assert "| max_tokens | 32768 (aime24) / 30000 (amc23) | – | – |" in table  # differs: named
    assert "| rope_scaling | none | none | none |" in table
    assert '"max_path_tokens": 16384' in md.split("## Configuration")[1]  # the last invocation's own
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["summary"]["amc23"]["P=4"]["settings"] == [par]
