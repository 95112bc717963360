"""Server metrics in the Prometheus text format, written by hand (no client library).

The engine thread counts requests, paths and tokens and snapshots the KV pool after every
iteration; the HTTP side counts rejected requests. Everything is read under one lock, so a
scrape sees one consistent state.
"""

from __future__ import annotations

import threading
from collections import Counter

# name -> (type, help)
METRICS: dict[str, tuple[str, str]] = {
    "parathinker_requests_total": ("counter", "Requests that ended, by status "
                                   "(finished, failed, aborted, rejected)."),
    "parathinker_paths_started_total": ("counter", "Reasoning paths admitted to the engine."),
    "parathinker_paths_finished_total": ("counter", "Reasoning paths closed, by reason "
                                         "(end, budget, cut)."),
    "parathinker_paths_cut_total": ("counter", "Paths closed by the termination policy "
                                    "(min_finished_paths reached) before they ended."),
    "parathinker_tokens_total": ("counter", "Tokens by kind: prompt (prefilled), path and "
                                 "summary (generated, tags and template included)."),
    "parathinker_request_latency_seconds": ("summary", "Latency of finished requests, from "
                                            "arrival in the engine to the end of the summary."),
    "parathinker_engine_steps_total": ("counter", "Engine steps (one forward each)."),
    "parathinker_kv_cache_blocks_used": ("gauge", "KV cache blocks in use."),
    "parathinker_kv_cache_blocks_total": ("gauge", "KV cache blocks in the pool."),
    "parathinker_requests_running": ("gauge", "Requests the engine is running."),
    "parathinker_requests_waiting": ("gauge", "Requests waiting in the engine for KV blocks."),
    "parathinker_requests_in_flight": ("gauge", "Requests accepted by the server and not yet "
                                       "answered (the --max-queued limit applies to this)."),
}


class Metrics:
    def __init__(self, num_blocks_total: int = 0) -> None:
        self._lock = threading.Lock()
        self._counters: Counter[tuple[str, str]] = Counter()  # (name, labels) -> value
        self._gauges: dict[str, float] = {"parathinker_kv_cache_blocks_total": num_blocks_total}

    def inc(self, name: str, value: float = 1, **labels: str) -> None:
        key = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        with self._lock:
            self._counters[(name, key)] += value

    def set(self, name: str, value: float) -> None:
        with self._lock:
            self._gauges[name] = value

    def get(self, name: str, **labels: str) -> float:
        key = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        with self._lock:
            if name in self._gauges:
                return self._gauges[name]
            return self._counters[(name, key)]

    def render(self) -> str:
        """The exposition text; every known metric appears, at 0 if never touched."""
        defaults = {
            "parathinker_requests_total": [f'status="{s}"' for s in
                                           ("finished", "failed", "aborted", "rejected")],
            "parathinker_paths_finished_total": [f'reason="{r}"' for r in ("end", "budget", "cut")],
            "parathinker_tokens_total": [f'kind="{k}"' for k in ("prompt", "path", "summary")],
        }
        with self._lock:
            counters, gauges = dict(self._counters), dict(self._gauges)
        lines = []
        for name, (kind, help_text) in METRICS.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            if kind == "gauge":
                lines.append(f"{name} {_fmt(gauges.get(name, 0))}")
                continue
            if kind == "summary":  # counted as {name}_sum and {name}_count
                for part in ("sum", "count"):
                    lines.append(f"{name}_{part} {_fmt(counters.get((f'{name}_{part}', ''), 0))}")
                continue
            keys = set(defaults.get(name, [""])) | {k for (n, k) in counters if n == name}
            for key in sorted(keys):
                label = f"{{{key}}}" if key else ""
                lines.append(f"{name}{label} {_fmt(counters.get((name, key), 0))}")
        return "\n".join(lines) + "\n"


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def parse(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (for tests and the load script)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out
