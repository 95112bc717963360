"""Shared pieces of the benchmarks: machine line, random models of a given shape, reporting.

Every benchmark: fixed seed and workload, a warm-up, synchronized timers, the machine, commit and
configuration printed first, and one JSON line last.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from typing import Any

import torch

from parathinker.config import ModelConfig
from parathinker.model.decoder import ParaThinkerForCausalLM
from parathinker.model.rope import rope_parameters
from parathinker.spec.tokens import ControlTokens

QWEN_1_5B = dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                 num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=131072,
                 tie_word_embeddings=False, max_segments=32)
SMALL = dict(QWEN_1_5B, vocab_size=32000, hidden_size=512, intermediate_size=1536,
             num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2)


def machine() -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True).stdout.strip())
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__, "python": platform.python_version(), "commit": commit}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


SHAPES = {"1.5b": QWEN_1_5B, "small": SMALL}


def add_model_flags(ap: Any) -> None:
    """--model (a random shape) --device --dtype --attention --linear, shared by the engine benches."""
    ap.add_argument("--model", choices=list(SHAPES), default="1.5b",
                    help="random weights of the 1.5B shape, or the small one (hidden 512, 8 layers)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32")
    ap.add_argument("--attention", default="auto", help="auto, runs, flex or gathered")
    ap.add_argument("--linear", default="auto")


def start(args: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Seed, print the machine and the configuration; -> (model shape, config to report)."""
    torch.manual_seed(0)
    shape = SHAPES[args.model]
    config = vars(args) | {"model_shape": shape}
    print("machine:", machine())
    print("config:", config)
    return shape, config


def random_model(cfg: dict[str, Any], device: str = "cpu", dtype: torch.dtype = torch.float32,
                 seed: int = 0) -> ParaThinkerForCausalLM:
    """Random weights of the given shape, without the cost of nn.Linear's default init."""
    config = ModelConfig.from_dict(cfg)
    with torch.device("meta"):
        model = ParaThinkerForCausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=gen)
    inv_freq, _ = rope_parameters(config.head_dim, config.rope_theta, config.rope_scaling)
    model.inv_freq = inv_freq.to(device)
    return model.eval()


def synthetic_ctrl(vocab_size: int, max_paths: int = 16) -> tuple[ControlTokens, list[int]]:
    """Control tokens at the top of the vocabulary and an 8-token summary template."""
    top = vocab_size - 1
    opens = tuple(top - 2 * k for k in range(max_paths))
    closes = tuple(top - 2 * k - 1 for k in range(max_paths))
    base = top - 2 * max_paths
    ctrl = ControlTokens(opens, closes, summary_open=base, summary_close=base - 1, eos=base - 2,
                         pad=base - 3, base_think_open=base - 4, base_think_close=base - 5)
    return ctrl, [base] + list(range(1000, 1007))


def prompt_ids(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 30000, (n,), generator=g).tolist()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def report(name: str, config: dict[str, Any], results: dict[str, Any]) -> None:
    print(json.dumps({"bench": name, "machine": machine(), "config": config, "results": results}))
