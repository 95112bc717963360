"""Benchmark problems: load a JSONL file of {"id", "problem", "answer", ...} records, validated.

    from parathinker.eval.data import load_benchmark
    problems = load_benchmark("aime24")                   # built-in name: local file, else the HF hub
    problems = load_benchmark("mine", data="mine.jsonl")  # any JSONL file

A built-in name is looked up as `<name>.jsonl` in, in order: each directory of $PARATHINKER_DATA_DIR
(os.pathsep-separated), `../shared/benchmarks` from the current directory, `../shared/benchmarks` from
the repository root; then downloaded from the Hugging Face hub (`HUB_DATASETS`: the H4 copies for
AIME 2024 and MATH-500, math-ai's for AIME 2025 and AMC 2023; parquet files need pyarrow).
Every record keeps its extra fields; `id` and `answer` are returned as strings.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

BENCHMARKS = ("aime24", "aime25", "amc23", "math500")
HUB_DATASETS = {
    "aime24": "HuggingFaceH4/aime_2024",
    "aime25": "math-ai/aime25",
    "amc23": "math-ai/amc23",
    "math500": "HuggingFaceH4/MATH-500",
}
_REPO_ROOT = Path(__file__).resolve().parents[2]


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Validated records of a benchmark JSONL file; errors name the file, the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file not found: {path}")
    records: list[dict[str, Any]] = []
    first_line: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            records.append(_check_record(record, where))
            rid = record["id"]
            if rid in first_line:
                raise ValueError(f"{where}: duplicate id {rid!r} (first on line {first_line[rid]})")
            first_line[rid] = n
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def _check_record(record: dict[str, Any], where: str) -> dict[str, Any]:
    for field in ("id", "problem", "answer"):
        value = record.get(field)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and field != "problem":
            value = record[field] = str(value)  # AMC answers or ids stored as numbers
        if not isinstance(value, str) or not value.strip():
            got = "missing" if field not in record else f"got {json.dumps(value)[:40]}"
            raise ValueError(f"{where}: field {field!r} must be a non-empty string ({got})")
    return record


def _candidate_dirs() -> list[Path]:
    env = os.environ.get("PARATHINKER_DATA_DIR", "")
    dirs = [Path(d) for d in env.split(os.pathsep) if d]
    dirs += [Path.cwd().parent / "shared" / "benchmarks", _REPO_ROOT.parent / "shared" / "benchmarks"]
    return list(dict.fromkeys(d.resolve() for d in dirs))  # in order, without repeats


def _from_hub(name: str) -> list[dict[str, Any]]:
    """Download a built-in benchmark and map its fields to id/problem/answer."""
    from huggingface_hub import hf_hub_download, list_repo_files

    repo = HUB_DATASETS[name]
    files = [f for f in list_repo_files(repo, repo_type="dataset") if f.endswith((".jsonl", ".json", ".parquet"))]
    files.sort(key=lambda f: ("test" not in f, not f.endswith(".jsonl"), f))  # prefer a test split, JSONL
    if not files:
        raise FileNotFoundError(f"no .jsonl/.json/.parquet file in dataset {repo}")
    local = Path(hf_hub_download(repo, files[0], repo_type="dataset"))
    if local.suffix == ".parquet":
        import pyarrow.parquet as pq  # only needed for this fallback

        rows = pq.read_table(local).to_pylist()
    elif local.suffix == ".json":
        rows = json.loads(local.read_text(encoding="utf-8"))
    else:
        rows = [json.loads(line) for line in local.read_text(encoding="utf-8").splitlines() if line.strip()]
    from parathinker.spec.tokens import last_boxed

    records = []
    for i, row in enumerate(rows):
        problem = row.get("problem") or row.get("question") or row.get("Problem")
        answer = row.get("answer", row.get("Answer"))
        if answer is None and isinstance(row.get("solution"), str):
            answer = last_boxed(row["solution"])
        rid = row.get("id", row.get("unique_id", row.get("ID")))
        if isinstance(answer, float) and answer.is_integer():
            answer = int(answer)
        extra = {k: v for k, v in row.items() if k not in ("id", "problem", "answer")}
        record = {**extra, "id": f"{name}-{i:03d}" if rid is None else rid, "problem": problem, "answer": answer}
        records.append(_check_record(record, f"{repo}/{files[0]} row {i}"))
    return records


def benchmark_source(name: str, data: str | Path | None = None) -> dict[str, Any]:
    """Where load_benchmark(name, data) reads from: {"path", "sha256"} of the file, or the hub
    dataset when no local file exists."""
    import hashlib

    path = Path(data) if data is not None else next(
        (d / f"{name}.jsonl" for d in _candidate_dirs() if (d / f"{name}.jsonl").is_file()), None)
    if path is None:
        return {"hub": HUB_DATASETS.get(name)}
    return {"path": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def load_benchmark(name: str, data: str | Path | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """Problems of benchmark `name`, from `data` if given, else from the built-in locations; first `limit`."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if data is not None:
        records = read_jsonl(data)
    elif name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}: known are {', '.join(BENCHMARKS)}; or pass --data FILE")
    else:
        tried = [d / f"{name}.jsonl" for d in _candidate_dirs()]
        local = next((p for p in tried if p.is_file()), None)
        if local is not None:
            records = read_jsonl(local)
        else:
            try:
                records = _from_hub(name)
            except Exception as e:  # offline, missing package, renamed files: all mean "not here"
                looked = "\n  ".join(str(p) for p in tried)
                raise FileNotFoundError(
                    f"benchmark {name!r} not found. Looked at:\n  {looked}\n  Hugging Face hub dataset "
                    f"{HUB_DATASETS[name]} ({type(e).__name__}: {e})\nPass --data FILE (a JSONL file with "
                    f"id/problem/answer per line) or set PARATHINKER_DATA_DIR."
                ) from e
    return records if limit is None else records[:limit]
