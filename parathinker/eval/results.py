"""Per-sample eval results in `<output>/samples.jsonl` that survive interruption and support resume.

    with SampleStore(out_dir) as store:
        for problem in problems:
            if key not in store.done_keys(): ... store.append(record)

One JSON object per line, written, flushed and fsynced as soon as a sample is graded. A run killed
mid-write leaves a last line without its newline: on open it is dropped (with a warning) and the file
truncated to the last complete line, so that sample is simply run again, never counted twice.
A record's key is (benchmark, mode, num_paths, id, sample, layout, gate); a parathinker record
written before layouts existed is a native one, plain traces have no layout (None); the gate is
(stop_on_agreement, prune_confidence), (0, None) for a record without them (ungated).
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

SampleKey = tuple[str, str, int, str, int, str | None, tuple[int, float | None]]
REQUIRED_FIELDS = ("benchmark", "id", "mode", "num_paths", "sample", "answer", "correct")


def layout_of(mode: str, layout: str | None) -> str | None:
    """A sample's layout: parathinker requests are native unless said otherwise; plain traces
    (sequential, majority, build-data's) have none."""
    if mode == "parathinker":
        return layout or "native"
    return None


def sample_key(record: dict[str, Any]) -> SampleKey:
    mode = str(record["mode"])
    return (
        str(record["benchmark"]), mode, int(record["num_paths"]),
        str(record["id"]), int(record["sample"]), layout_of(mode, record.get("layout")),
        gate_of(record),
    )


def gate_of(record: dict[str, Any]) -> tuple[int, float | None]:
    """A record's (stop_on_agreement, prune_confidence); (0, None) when it has none (ungated)."""
    prune = record.get("prune_confidence")
    return (int(record.get("stop_on_agreement") or 0), None if prune is None else float(prune))


class SampleStore:
    """Append-only store of sample records; `done_keys()` says what a resumed run can skip."""

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / "samples.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._records = self._load_and_repair()
        self._keys = {sample_key(r) for r in self._records}
        self._lock = threading.Lock()
        self._file = self.path.open("a", encoding="utf-8")

    def _load_and_repair(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        cut = data.rfind(b"\n") + 1
        complete, tail = data[:cut], data[cut:]
        if tail.strip():  # the last write did not finish: drop it, keep every complete line
            warnings.warn(
                f"{self.path}: dropped a truncated last line ({len(tail)} bytes, an interrupted write); "
                "that sample will be run again",
                stacklevel=3,
            )
            with self.path.open("r+b") as f:
                f.truncate(len(complete))
                f.flush()
                os.fsync(f.fileno())
        records = []
        for n, line in enumerate(complete.decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                sample_key(record)
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{self.path}:{n}: not a sample record ({e}); fix or remove the line") from None
            records.append(record)
        return records

    def done_keys(self) -> set[SampleKey]:
        with self._lock:
            return set(self._keys)

    def records(self) -> list[dict[str, Any]]:
        """Every record written so far (read at open, plus those appended since)."""
        with self._lock:
            return list(self._records)

    def append(self, record: dict[str, Any]) -> None:
        """Write one record durably (flush + fsync). A key already stored is an error."""
        missing = [f for f in REQUIRED_FIELDS if f not in record]
        if missing:
            raise ValueError(f"sample record lacks field(s) {', '.join(missing)}")
        key = sample_key(record)
        line = json.dumps(record, ensure_ascii=False) + "\n"  # before the lock: fail early, write whole
        with self._lock:
            if key in self._keys:
                raise ValueError(f"{self.path}: sample {key} is already stored")
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._keys.add(key)
            self._records.append(record)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SampleStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
