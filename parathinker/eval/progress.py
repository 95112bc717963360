"""The progress bar of an eval run: samples done, running accuracy, the configuration at hand."""

from __future__ import annotations

import sys
from typing import Any

from parathinker.eval.report import config_label


class Progress:
    def __init__(self, total: int, resumed: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="sample", desc="eval", file=sys.stderr, dynamic_ncols=True,
                        mininterval=0.5)
        self.num_correct = 0
        self.num_done = 0
        self.num_failed = 0
        if resumed:
            self.bar.write(f"resuming: {resumed} samples already stored, {total} to run", file=sys.stderr)

    def update(self, record: dict[str, Any]) -> None:
        self.num_done += 1
        self.num_correct += bool(record["correct"])
        self.num_failed += record.get("error") is not None
        label = config_label(record["mode"], record["num_paths"], record.get("layout"))
        self.bar.set_postfix_str(f"{record['benchmark']} {label} | acc "
                                 f"{100 * self.num_correct / self.num_done:.1f}%", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
