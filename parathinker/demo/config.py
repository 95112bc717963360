"""The demo's settings: the task, the tiny model, its training and its evaluation (one frozen
dataclass; `pipeline.PRESETS` names the runs)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DemoConfig:
    seed: int = 0
    # the task: a·x + c = b mod 13; a path checks at most `tries` of the 12 candidates
    tries: int = 7
    num_train: int = 24000
    num_held_out: int = 99  # of the 1716 problems, never trained on
    max_train_paths: int = 8
    # of the training samples, written as stop_on_agreement = 2 or 3 leaves them (paths cut
    # mid-step and marked so), for a summary that reads cut paths (docs/demo/GATING.md)
    agreement_share: float = 0.5
    # the model: a tiny Qwen2 decoder trained from scratch, a BPE tokenizer trained on the task
    vocab_size: int = 1024  # above what the BPE can merge on this corpus: every number is one token
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    # training (`parathinker train`)
    max_steps: int = 2800
    learning_rate: float = 3e-3
    warmup_ratio: float = 0.05
    rows_per_step: int = 4
    max_row_tokens: int = 1024  # a sample of 8 paths of 7 tries holds up to ~810 tokens
    # evaluation (`parathinker eval`): paths waited for, a fixed per-path budget
    paths: tuple[int, ...] = (1, 2, 4, 8)
    samples: int = 4
    max_path_tokens: int = 104  # the teacher's longest path (7 misses, `not found.`) is 90 tokens
    max_summary_tokens: int = 32
    temperature: float = 1.0
    # torch's CPU threads for everything the demo runs, whatever the core count (torch's default:
    # one per core). 1 and 2 gave the same bits here; 1 is not slowed down by a busy machine
    threads: int = 1
