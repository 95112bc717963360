"""Attention over the paged KV pool, reading K/V in place (no copy of any context): which
backend, picked once when the engine's runner (or the slow twin) is built.

The pool, one step's metadata (O(runs) of slots per sequence) and the backends' interface are
in `attention.pool`. The backends, each a class with `build_metadata` (once per step) and
`attend` (once per layer):

- "runs" (CPU default, `attention.runs`): per sequence, a flash kernel over each run of its
  prefix (a view of the pool) and causally over its new tokens, merged by log-sum-exp; no
  queries x context tensor. Decode tokens: batched over short contexts, and in float32 over
  long ones one softmax over their runs' scores (`attention.long_decode`).
- "flex" (GPU default; also compiles on CPU, `attention.flex_paged`): FlexAttention over the
  whole pool with a block mask built from the same runs.
- "gathered" (`attention.gathered`): gathers each context into a new tensor and runs masked
  SDPA: the slow, obviously-correct twin the others are tested against.
"""

from __future__ import annotations

import torch

from parathinker.attention.flex_paged import FlexPagedBackend
from parathinker.attention.gathered import GatheredBackend
from parathinker.attention.pool import PagedBackend
from parathinker.attention.runs import RunsBackend

BACKENDS = ("runs", "flex", "gathered")  # LLM(attention=...), --attention; "auto" picks one


def backend_for(name: str, device: torch.device | str) -> PagedBackend:
    """"auto": the runs backend on CPU (it wins there, BENCHMARKS.md), FlexAttention on CUDA."""
    if name == "auto":
        name = "flex" if torch.device(device).type == "cuda" else "runs"
    if name == "runs":
        return RunsBackend()
    if name == "flex":
        return FlexPagedBackend()
    if name == "gathered":
        return GatheredBackend()
    raise ValueError(f"unknown attention backend {name!r}; use auto or one of {BACKENDS}")
