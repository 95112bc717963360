"""Tests for parathinker.eval.data (benchmark loading) and parathinker.eval.results (SampleStore)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from parathinker.eval import data
from parathinker.eval.data import BENCHMARKS, load_benchmark, read_jsonl
from parathinker.eval.results import SampleStore
from tests import SHARED

BENCH = SHARED / "benchmarks"
needs_shared = pytest.mark.skipif(
    not all((BENCH / f"{b}.jsonl").is_file() for b in BENCHMARKS),
    reason=f"benchmark files not found in {BENCH} (the shared data folder beside the repo)",
)


@needs_shared
@pytest.mark.parametrize("name,count", [("aime24", 30), ("aime25", 30), ("amc23", 40), ("math500", 500)])
def test_real_benchmarks(name: str, count: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARATHINKER_DATA_DIR", str(BENCH))
    records = load_benchmark(name)
    assert len(records) == count
    assert all(isinstance(r["answer"], str) and r["answer"] and r["problem"] for r in records)
    assert len({r["id"] for r in records}) == count
    assert records[0]["dataset"] == name  # extra fields kept
    assert load_benchmark(name, data=BENCH / f"{name}.jsonl", limit=3) == records[:3]


@needs_shared
def test_found_beside_repo_without_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PARATHINKER_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # not found from the cwd: found from the repo root
    assert len(load_benchmark("amc23")) == 40


def test_env_dir_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "aime24.jsonl").write_text('{"id": "a", "problem": "1+1?", "answer": 2}\n')
    monkeypatch.setenv("PARATHINKER_DATA_DIR", str(tmp_path))
    assert load_benchmark("aime24") == [{"id": "a", "problem": "1+1?", "answer": "2"}]


def test_not_found_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(name: str) -> list:
        raise ConnectionError("offline")

    monkeypatch.setenv("PARATHINKER_DATA_DIR", str(tmp_path / "none"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "_REPO_ROOT", tmp_path / "repo")
    monkeypatch.setattr(data, "_from_hub", offline)
    with pytest.raises(FileNotFoundError) as e:
        load_benchmark("math500")
    msg = str(e.value)
    assert str(tmp_path / "none" / "math500.jsonl") in msg and "HuggingFaceH4/MATH-500" in msg
    assert "--data FILE" in msg and "offline" in msg


def test_unknown_name() -> None:
    with pytest.raises(ValueError, match="aime24, aime25, amc23, math500"):
        load_benchmark("gsm8k")


def test_custom_file_and_limit(tmp_path: Path) -> None:
    f = tmp_path / "mine.jsonl"
    rows = [{"id": i, "problem": f"p{i}", "answer": i * 1.5, "x": 1} for i in range(5)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    records = load_benchmark("mine", data=f, limit=2)
    assert records == [
        {"id": "0", "problem": "p0", "answer": "0.0", "x": 1},
        {"id": "1", "problem": "p1", "answer": "1.5", "x": 1},
    ]
    assert load_benchmark("mine", data=f, limit=0) == []


@pytest.mark.parametrize(
    "lines,pattern",
    [
        (['{"id": "a", "problem": "p", "answer": "1"}', '{"id": "b", "problem": "p", "answer": "1"'],
         r"bad\.jsonl:2: invalid JSON"),
        (['["a", "p", "1"]'], r"bad\.jsonl:1: expected a JSON object, got list"),
        (['{"id": "a", "answer": "1"}'], r"bad\.jsonl:1: field 'problem' must be a non-empty string \(missing\)"),
        (['{"id": "a", "problem": "p", "answer": " "}'], r"bad\.jsonl:1: field 'answer' must be a non-empty string"),
        (['{"id": "a", "problem": "p"}'], r"bad\.jsonl:1: field 'answer' .*\(missing\)"),
        (['{"id": "a", "problem": "p", "answer": null}'], r"bad\.jsonl:1: field 'answer' .*\(got null\)"),
        (['{"problem": "p", "answer": "1"}'], r"bad\.jsonl:1: field 'id'"),
        (['{"id": "a", "problem": "p", "answer": "1"}', "", '{"id": "a", "problem": "q", "answer": "2"}'],
         r"bad\.jsonl:3: duplicate id 'a' \(first on line 1\)"),
        ([""], r"bad\.jsonl: no records"),
    ],
)
def test_bad_input(tmp_path: Path, lines: list[str], pattern: str) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=pattern):
        read_jsonl(f)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_benchmark("aime24", data=tmp_path / "nope.jsonl")


def _record(i: int, sample: int = 0, **extra: object) -> dict:
    return {"benchmark": "aime24", "id": f"q{i}", "mode": "parathinker", "num_paths": 4, "sample": sample,
            "answer": str(i), "correct": i % 2 == 0, **extra}


def test_sample_store_resume(tmp_path: Path) -> None:
    with SampleStore(tmp_path) as store:
        assert store.done_keys() == set()
        store.append(_record(1, latency_s=0.5))
        store.append(_record(1, sample=1))
        with pytest.raises(ValueError, match="already stored"):
            store.append(_record(1))
        with pytest.raises(ValueError, match="lacks field"):
            store.append({"benchmark": "aime24"})
    with SampleStore(tmp_path) as store:
        ungated = (0, None)  # stop_on_agreement, prune_confidence of a record without them
        assert store.done_keys() == {("aime24", "parathinker", 4, "q1", 0, "native", ungated),
                                     ("aime24", "parathinker", 4, "q1", 1, "native", ungated)}
        assert store.records()[0]["latency_s"] == 0.5
        store.append(_record(2))
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 3


def test_sample_store_repairs_truncated_line(tmp_path: Path) -> None:
    with SampleStore(tmp_path) as store:
        store.append(_record(1))
        store.append(_record(2))
    path = tmp_path / "samples.jsonl"
    whole = path.read_bytes()
    path.write_bytes(whole + json.dumps(_record(3)).encode()[:25])  # killed mid-write
    with pytest.warns(UserWarning, match="truncated last line"):
        store = SampleStore(tmp_path)
    assert path.read_bytes() == whole
    assert {k[3] for k in store.done_keys()} == {"q1", "q2"}
    store.append(_record(3))  # the dropped sample is run again, once
    store.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["q1", "q2", "q3"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a healthy file opens without a warning
        SampleStore(tmp_path).close()


def test_sample_store_rejects_corrupt_middle_line(tmp_path: Path) -> None:
    (tmp_path / "samples.jsonl").write_text(json.dumps(_record(1)) + "\n{oops\n" + json.dumps(_record(2)) + "\n")
    with pytest.raises(ValueError, match=r"samples\.jsonl:2"):
        SampleStore(tmp_path)
