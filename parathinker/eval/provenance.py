"""Provenance: one line of runs.jsonl per invocation (who ran what, where, with which code)."""

from __future__ import annotations

import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from parathinker.eval.config import EvalConfig
from parathinker.spec.tokens import DEFAULT_PROMPT_TEMPLATE, DEFAULT_SUMMARY_TEMPLATE, SEQUENTIAL_PROMPT_TEMPLATE


def git_commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}-dirty" if dirty else head or "unknown"


def redacted_command(argv: list[str]) -> str:
    """The command line as typed, without the value of --api-key."""
    out: list[str] = []
    for i, a in enumerate(argv):
        if i and argv[i - 1] == "--api-key":
            a = "***"
        elif a.startswith("--api-key="):
            a = "--api-key=***"
        out.append(a)
    return " ".join(out)


def engine_info(llm: Any) -> dict[str, Any]:
    import torch

    return {"model_dir": str(llm.model_dir), "device": str(llm.device),
            "dtype": str(llm.dtype).removeprefix("torch."), "linear": getattr(llm, "linear_backend", None),
            "layout": getattr(llm, "layout", None), "rope_scaling": llm.config.rope_scaling,
            "attention": llm.engine.runner.attention, "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(llm.device) if llm.device.type == "cuda" else None}


def provenance(cfg: EvalConfig, engines: dict[str, dict[str, Any]], num_planned: int, num_run: int,
               num_failed: int, status: str,
               data_sources: dict[str, dict[str, Any]] | None = None,
               servers: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """One line of runs.jsonl: who ran what, where, with which code and settings; with
    --endpoint, `servers`: each server's share of this invocation (samples, tokens, throughput)."""
    import parathinker

    return {
        "status": status, "config": cfg.public_dict(), "command": redacted_command(sys.argv),
        "parathinker_version": parathinker.__version__, "git_commit": git_commit(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "python": platform.python_version(), "backend": cfg.backend,
        "endpoint": cfg.endpoint, **({"servers": servers} if servers is not None else {}),
        "engines": engines, "data": data_sources or {},
        "rope_scaling": {mode: cfg.rope_for(mode) for mode in cfg.modes}, "layouts": list(cfg.layouts),
        "prompt_template": DEFAULT_PROMPT_TEMPLATE, "summary_template": DEFAULT_SUMMARY_TEMPLATE,
        "sequential_template": SEQUENTIAL_PROMPT_TEMPLATE,
        "num_samples_planned": num_planned, "num_samples_run": num_run, "num_samples_failed": num_failed,
    }
