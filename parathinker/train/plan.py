"""Which rows every optimizer step trains on: a pure function of the data, the seed and the
world size, so every process computes the same plan and a resumed run continues exactly.

Epoch e shuffles the samples (seeded by seed and e) and groups them into rows (`epoch_plan`).
One optimizer step takes `rows_per_step = num_processes * grad_accum * batch_size` rows; the
last step of an epoch wraps around to the epoch's first rows so that every process always has
a full step (as accelerate's `even_batches` does). With `max_steps` beyond the epochs' steps,
further epochs follow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from parathinker.train.data import TokenSample
from parathinker.train.pack import epoch_plan


@dataclass(frozen=True)
class StepPlan:
    epochs: tuple[tuple[tuple[int, ...], ...], ...]  # epoch -> row -> sample indices
    rows_per_step: int
    total_steps: int

    @classmethod
    def build(cls, samples: Sequence[TokenSample], max_row_tokens: int, seed: int,
              num_epochs: int, max_steps: int | None, rows_per_step: int, shuffle: bool = True,
              pack: bool = True) -> StepPlan:
        if rows_per_step < 1:
            raise ValueError(f"rows_per_step must be >= 1, got {rows_per_step}")
        if max_steps is None and num_epochs < 1:
            raise ValueError("train for at least one epoch or set max_steps")

        def plan(e: int) -> tuple[tuple[int, ...], ...]:
            rows = epoch_plan(samples, max_row_tokens, seed, e, shuffle, pack)
            return tuple(tuple(r) for r in rows)

        epochs = [plan(e) for e in range(max(num_epochs, 1))]
        steps = sum(math.ceil(len(rows) / rows_per_step) for rows in epochs)
        total = steps if max_steps is None else max_steps
        while steps < total:
            epochs.append(plan(len(epochs)))
            steps += math.ceil(len(epochs[-1]) / rows_per_step)
        return cls(tuple(epochs), rows_per_step, total)

    def steps_in_epoch(self, epoch: int) -> int:
        return math.ceil(len(self.epochs[epoch]) / self.rows_per_step)

    def locate(self, step: int) -> tuple[int, int]:
        """Global step (0-based) -> (epoch, step within the epoch)."""
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} outside 0..{self.total_steps - 1}")
        for epoch in range(len(self.epochs)):
            n = self.steps_in_epoch(epoch)
            if step < n:
                return epoch, step
            step -= n
        raise IndexError(step)

    def step_rows(self, step: int) -> list[tuple[int, int]]:
        """(epoch, row index) of the `rows_per_step` rows of a step, in order."""
        epoch, local = self.locate(step)
        num_rows = len(self.epochs[epoch])
        first = local * self.rows_per_step
        return [(epoch, (first + i) % num_rows) for i in range(self.rows_per_step)]

    def micro_batch(self, step: int, accum: int, rank: int, world: int,
                    batch_size: int) -> list[tuple[int, int]]:
        """Rows of micro-batch `accum` on process `rank`: consecutive micro-batches go to
        consecutive processes."""
        rows = self.step_rows(step)
        start = (accum * world + rank) * batch_size
        return rows[start:start + batch_size]

    def epoch_progress(self, step: int) -> float:
        """Epochs of data trained on after `step` (0-based), as HF Trainer's `epoch`: the whole
        epochs before, plus the fraction of this epoch's rows seen (a last step that wraps around
        to the epoch's first rows completes the epoch; it does not count them twice)."""
        epoch, local = self.locate(step)
        num_rows = len(self.epochs[epoch])
        return epoch + min((local + 1) * self.rows_per_step, num_rows) / num_rows
