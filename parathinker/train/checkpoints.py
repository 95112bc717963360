"""Training checkpoints: engine-loadable weights (SPEC §1 layout) plus the state to resume from.

    <output>/checkpoint-<step>/
        config.json, model.safetensors (or shards), tokenizer files   <- LLM/engine load this
        trainer_state.json   step, epoch, total steps (written last: its presence = complete)
        train_config.json    the resolved TrainConfig
        state/               accelerate's save_state: optimizer, scheduler, RNG (and its own
                             copy of the weights, which DeepSpeed/FSDP need to resume)

A checkpoint is written to `checkpoint-<step>.tmp` and renamed when complete, so an
interrupted save never looks like the latest checkpoint.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from parathinker.config import ModelConfig
from parathinker.model import save_model

TRAINER_STATE = "trainer_state.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class _Weights:
    """What `save_model` reads from a model, for a (gathered) state dict without a module."""

    config: ModelConfig
    state: dict[str, torch.Tensor]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.state

    def parameters(self) -> Iterator[torch.Tensor]:
        return iter(self.state.values())


def export_weights(state: dict[str, torch.Tensor], config: ModelConfig, out_dir: str | Path,
                   tokenizer: Any = None, dtype: torch.dtype | None = None,
                   prefix: str = "model.") -> Path:
    """Write a state dict (keys `prefix` + the model's parameter names) in the SPEC §1 layout."""
    clean = {k.removeprefix(prefix): v.detach().cpu() for k, v in state.items()}
    if dtype is not None:
        clean = {k: v.to(dtype) if v.is_floating_point() else v for k, v in clean.items()}
    return save_model(_Weights(config, clean), out_dir, tokenizer)


def checkpoints(output: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of an output directory, oldest first."""
    out = []
    root = Path(output)
    if root.is_dir():
        for d in root.iterdir():
            m = _CKPT.match(d.name)
            if m and (d / TRAINER_STATE).is_file():
                out.append((int(m.group(1)), d))
    return sorted(out)


def latest_checkpoint(output: str | Path) -> Path | None:
    found = checkpoints(output)
    return found[-1][1] if found else None


def rotate(output: str | Path, keep: int | None) -> None:
    """Delete all but the newest `keep` checkpoints (None keeps all)."""
    if keep is None or keep < 1:
        return
    for _, d in checkpoints(output)[:-keep]:
        shutil.rmtree(d, ignore_errors=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def read_trainer_state(ckpt: str | Path) -> dict[str, Any]:
    path = Path(ckpt) / TRAINER_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt} is not a complete training checkpoint (no {TRAINER_STATE})")
    return json.loads(path.read_text())
