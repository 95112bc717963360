"""The progress bar of an eval run: samples done, running accuracy, the configuration at hand, and
(engine backend) the tokens sampled so far and their rate, refreshed as the engine steps, so that a
sample of thousands of tokens does not leave the bar looking stuck at 0/N."""

from __future__ import annotations

import sys
import time
from typing import Any

from parathinker.eval.report import config_label
from parathinker.eval.results import gate_of

REFRESH_S = 0.5  # the token counter redraws at most this often


class Progress:
    def __init__(self, total: int, resumed: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="sample", desc="eval", file=sys.stderr, dynamic_ncols=True,
                        mininterval=REFRESH_S)
        self.num_correct = 0
        self.num_done = 0
        self.num_failed = 0
        self.num_tokens = 0
        self.sample_text = ""
        self.first_token_at: float | None = None
        self.shown_at = 0.0
        if resumed:
            self.bar.write(f"resuming: {resumed} samples already stored, {total} to run", file=sys.stderr)

    def update(self, record: dict[str, Any]) -> None:
        self.num_done += 1
        self.num_correct += bool(record["correct"])
        self.num_failed += record.get("error") is not None
        label = config_label(record["mode"], record["num_paths"], record.get("layout"), gate_of(record))
        self.sample_text = (f"{record['benchmark']} {label} | acc "
                            f"{100 * self.num_correct / self.num_done:.1f}%")
        self._postfix(refresh=False)
        self.bar.update(1)

    def add_tokens(self, n: int) -> None:
        """`n` more tokens sampled (one engine step); redraws the bar at most every REFRESH_S."""
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        self.num_tokens += n
        if now - self.shown_at >= REFRESH_S:
            self.shown_at = now
            self._postfix(refresh=True)

    def _postfix(self, refresh: bool) -> None:
        parts = [self.sample_text] if self.sample_text else []
        if self.first_token_at is not None:
            elapsed = time.perf_counter() - self.first_token_at
            rate = f", {self.num_tokens / elapsed:.1f} tok/s" if elapsed >= 1 else ""  # not 1 step's
            parts.append(f"{self.num_tokens} tok{rate}")
        self.bar.set_postfix_str(" | ".join(parts), refresh=refresh)

    def close(self) -> None:
        self._postfix(refresh=False)  # the final token count, drawn by close()
        self.bar.close()
