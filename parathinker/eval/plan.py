"""Planning: every sample of a run (`Unit`), its seed and its request parameters.

A sample is one (benchmark, problem, mode, num_paths, sample index, layout): one ParaThinker
request with P paths (mode "parathinker", num_paths = P, layout native or reference), one plain
trace ("sequential", num_paths = 1), or N plain traces voted on ("majority", num_paths = N); plain
traces have no layout (None); a ParaThinker sample also has a gate (eval/config.py `Gate`). Every
sample has its own seed, derived from --seed and its key without the layout and the gate, so the
two layouts, and every gate, of one sample draw from the same seed (a paired comparison).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from parathinker.config import PlainParams, SamplingParams
from parathinker.eval.config import EvalConfig, Gate
from parathinker.eval.results import SampleKey, layout_of


def derive_seed(*parts: Any) -> int:
    """A 31-bit seed from any JSON-able parts (stable across runs, machines and Python versions)."""
    digest = hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass(frozen=True)
class Unit:
    """One sample to produce."""

    benchmark: str
    problem: dict[str, Any]
    mode: str
    num_paths: int
    sample: int
    layout: str | None = None  # None for parathinker means native
    gate: Gate = Gate()  # parathinker only

    @property
    def key(self) -> SampleKey:
        return (self.benchmark, self.mode, self.num_paths, str(self.problem["id"]), self.sample,
                layout_of(self.mode, self.layout), self.gate.key)

    def seed(self, base_seed: int) -> int:
        return derive_seed(base_seed, *self.key[:5])


def plan(cfg: EvalConfig, problems: dict[str, list[dict[str, Any]]]) -> list[Unit]:
    """Every sample of the run: by configuration (and gate), then benchmark, then sample index,
    then problem (so an interrupted run has whole sweeps over the problems first)."""
    return [Unit(bench, p, mode, n, s, layout, gate) for mode, n, layout in cfg.configurations()
            for gate in (cfg.gates(n) if mode == "parathinker" else [Gate()])
            for bench in cfg.benchmarks for s in range(cfg.samples) for p in problems[bench]]


def request_params(cfg: EvalConfig, unit: Unit) -> tuple[SamplingParams | PlainParams, ...]:
    seed = unit.seed(cfg.seed)
    common = {"temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k}
    if unit.mode == "parathinker":
        return (SamplingParams(num_paths=unit.num_paths, max_path_tokens=cfg.max_path_tokens,
                               max_summary_tokens=cfg.max_summary_tokens,
                               min_finished_paths=min(cfg.min_finished_paths, unit.num_paths),
                               seed=seed, confidence_window=cfg.confidence_window,
                               confidence_top_k=cfg.confidence_top_k,
                               stop_on_agreement=unit.gate.stop_on_agreement,
                               prune_confidence=unit.gate.prune_confidence, **common),)
    if unit.mode == "sequential":
        return (PlainParams(max_tokens=cfg.sequential_max_tokens, seed=seed, **common),)
    return tuple(PlainParams(max_tokens=cfg.vote_max_tokens, seed=derive_seed(seed, j), **common)
                 for j in range(unit.num_paths))
