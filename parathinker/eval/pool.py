"""The grading thread pool: finished samples are graded while the engine keeps decoding."""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Sequence
from typing import Any

from parathinker.eval.config import EvalConfig
from parathinker.eval.plan import Unit
from parathinker.eval.progress import Progress
from parathinker.eval.records import build_record
from parathinker.eval.results import SampleStore


class GradingPool:
    """Grades finished samples on a few threads (math-verify runs in worker processes, so the
    threads mostly wait on pipes), and stores each record from the calling thread as soon as its
    grading is done."""

    def __init__(self, cfg: EvalConfig, store: SampleStore, progress: Progress) -> None:
        self.cfg, self.store, self.progress = cfg, store, progress
        self.pool = cf.ThreadPoolExecutor(max_workers=4, thread_name_prefix="eval-grade")
        self.pending: set[cf.Future[dict[str, Any]]] = set()

    def submit(self, unit: Unit, outputs: Sequence[Any], server: str | None = None) -> None:
        self.pending.add(self.pool.submit(build_record, self.cfg, unit, outputs, server))

    def store_finished(self, wait: bool = False) -> None:
        if not self.pending:
            return
        done, self.pending = cf.wait(self.pending, timeout=None if wait else 0,
                                     return_when=cf.ALL_COMPLETED)
        for fut in done:
            record = fut.result()
            self.store.append(record)
            self.progress.update(record)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
