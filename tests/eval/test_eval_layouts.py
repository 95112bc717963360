"""`parathinker eval --layout native,reference`: the layout is a dimension of the run. Records
carry it, resume keys include it, the report shows both layouts side by side, and the two layouts
of one sample share its seed (a paired comparison).

`test_eval_writes_every_layout_into_one_report` is parametrized over the layout lists; the list
with "reference" needs the engine's reference layout (SPEC §6)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from parathinker.eval.cli import main
from parathinker.eval.config import EvalConfig
from parathinker.eval.plan import plan
from parathinker.eval.report import summarize
from parathinker.eval.results import sample_key

PROBLEMS = [{"id": "a", "problem": "What is 2+3?", "answer": "5"},
            {"id": "b", "problem": "What is 6*7?", "answer": "42"}]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_layouts_share_seeds_and_differ_in_keys():
    cfg = EvalConfig(model="m", output="o", benchmarks=("x",), modes=("parathinker", "sequential"),
                     paths=(2, 4), layouts=("native", "reference"))
    assert cfg.configurations() == [("parathinker", 2, "native"), ("parathinker", 4, "native"),
                                    ("parathinker", 2, "reference"), ("parathinker", 4, "reference"),
                                    ("sequential", 1, None)]
    units = plan(cfg, {"x": PROBLEMS})
    assert len(units) == 10 and len({u.key for u in units}) == 10
    by = {(u.mode, u.num_paths, u.layout, u.problem["id"]): u for u in units}
    assert by["parathinker", 2, "native", "a"].seed(0) == by["parathinker", 2, "reference", "a"].seed(0)
    assert by["parathinker", 2, "native", "a"].seed(0) != by["parathinker", 4, "native", "a"].seed(0)
    with pytest.raises(ValueError, match="unknown layout"):
        EvalConfig(model="m", output="o", layouts=("native", "paged"))


def test_keys_of_records_written_before_layouts_are_native():
    old = {"benchmark": "x", "mode": "parathinker", "num_paths": 2, "id": "a", "sample": 0}
    assert sample_key(old) == ("x", "parathinker", 2, "a", 0, "native", (0, None))  # and ungated
    assert sample_key({**old, "layout": "reference"})[5] == "reference"
    assert sample_key({**old, "mode": "sequential", "num_paths": 1})[5] is None


def test_report_puts_each_reference_configuration_next_to_its_native_twin():
    def rec(mode, n, layout, correct):
        r = {"benchmark": "x", "mode": mode, "num_paths": n, "id": "a", "sample": 0,
             "answer": "5", "correct": correct}
        return r if layout is None else {**r, "layout": layout}

    records = [rec("parathinker", 4, "reference", True), rec("parathinker", 2, None, False),
               rec("majority", 2, None, True), rec("parathinker", 4, "native", False),
               rec("parathinker", 2, "reference", True), rec("sequential", 1, None, True)]
    summary = summarize(records)["x"]
    assert list(summary) == ["sequential", "P=2", "P=2 (reference)", "P=4", "P=4 (reference)",
                             "majority@2"]
    assert summary["P=2"]["accuracy"] == 0.0 and summary["P=2 (reference)"]["accuracy"] == 1.0
    assert summary["P=4 (reference)"]["layout"] == "reference" and summary["sequential"]["layout"] is None


@pytest.mark.parametrize("layouts", [("native",), ("native", "reference")])
def test_eval_writes_every_layout_into_one_report(ckpt_dir, tmp_path, capsys, layouts):
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS), encoding="utf-8")
    out = tmp_path / "run"
    args = ["--model", str(ckpt_dir), "--device", "cpu", "--benchmark", "mine", "--data", f"mine={data}",
            "--mode", "parathinker,sequential", "--paths", "2", "--max-path-tokens", "32",
            "--max-summary-tokens", "90", "--max-tokens", "20", "--temperature", "0", "--output", str(out)]
    # the first layout alone, then all of them resumed: only the new layouts run
    assert main([*args, "--layout", layouts[0]]) == 0
    first = _records(out / "samples.jsonl")
    assert len(first) == 4 and {r["layout"] for r in first} == {layouts[0], None}
    capsys.readouterr()
    assert main([*args, "--layout", ",".join(layouts), "--resume"]) == 0
    assert f"resuming: 4 samples already stored, {2 * (len(layouts) - 1)} to run" in capsys.readouterr().err
    records = _records(out / "samples.jsonl")
    assert records[:4] == first and len(records) == 4 + 2 * (len(layouts) - 1)
    assert len({sample_key(r) for r in records}) == len(records)
    par = [r for r in records if r["mode"] == "parathinker"]
    assert sorted(r["layout"] for r in par) == sorted(layouts * 2)
    assert all(r["error"] is None for r in records), [r["error"] for r in records]
    for r in par:  # every path of both layouts opens with its tag, the summary is graded
        assert len(r["path_tokens"]) == 2 and isinstance(r["correct"], bool)
    native = {r["id"]: r["prompt_tokens"] for r in par if r["layout"] == "native"}
    for r in par:  # the reference layout ran the padded prompt: a second BOS, pads to 16 (SPEC §6)
        if r["layout"] == "reference":
            assert r["prompt_tokens"] % 16 == 0 and r["prompt_tokens"] >= native[r["id"]] + 1
    labels = ["sequential"] + [f"P=2 ({lay})" if lay != "native" else "P=2" for lay in layouts]
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert list(summary["mine"]) == labels
    report = (out / "report.md").read_text()
    assert "| benchmark | " + " | ".join(labels) + " |" in report  # one table, side by side
    run = _records(out / "runs.jsonl")[-1]
    assert run["layouts"] == list(layouts)
    names = {"native": "parathinker", "reference": "parathinker (reference)"}
    assert {names[lay] for lay in layouts[1:]} <= set(run["engines"])
    for lay in layouts[1:]:
        assert run["engines"][names[lay]]["layout"] == lay
