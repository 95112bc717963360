"""The CPU demo end to end: scripted teacher -> `parathinker train` -> `parathinker eval` -> report.

    python -m parathinker.demo --output docs/demo            # the committed run
    python -m parathinker.demo --output /tmp/d --preset quick  # same training, half the eval (~30 min; the slow test)

Every step is one of the project's own commands, printed before it runs, so the run can be
repeated by hand. Work files (data, the untrained checkpoint, training checkpoints, eval samples)
go to `<output>/work`; the trained model is copied to `<output>/model`; `<output>/README.md` is
the report (numbers, plot, and whether the accuracy ordering holds).
"""

from __future__ import annotations

import filecmp
import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from parathinker.demo.config import DemoConfig
from parathinker.demo.report import (check_claims, entropy_floor, render, summary_breakdown,
                                     teacher_accuracy, teacher_agreement_saving)
from parathinker.demo.task import build
from parathinker.eval.data import read_jsonl
from parathinker.train.data import read_samples


PRESETS = {
    "full": DemoConfig(),
    "quick": DemoConfig(samples=2),  # the same training; half the eval samples
}


def _run(argv: list[str], log: Any) -> None:
    from parathinker.cli import main

    log("$ parathinker " + " ".join(argv))
    start = time.perf_counter()
    rc = main(argv)
    if rc != 0:
        raise RuntimeError(f"`parathinker {argv[0]}` failed with exit code {rc}")
    log(f"  ({time.perf_counter() - start:.0f} s)")


def make_initial_checkpoint(cfg: DemoConfig, train_file: Path, out_dir: Path) -> None:
    """A random tiny decoder with a byte-level BPE trained on the task's own text."""
    from parathinker.testing.tiny import random_checkpoint, tiny_config, train_tokenizer
    from parathinker.spec.tokens import DEFAULT_PROMPT_TEMPLATE, DEFAULT_SUMMARY_TEMPLATE

    corpus = []
    for s in read_samples(train_file)[0]:
        corpus += [DEFAULT_PROMPT_TEMPLATE.replace("{question}", s.question), *s.paths,
                   DEFAULT_SUMMARY_TEMPLATE + s.summary]
    tokenizer = train_tokenizer(corpus, vocab_size=cfg.vocab_size)
    config = tiny_config(len(tokenizer), hidden_size=cfg.hidden_size,
                         intermediate_size=4 * cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                         num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
                         head_dim=cfg.hidden_size // cfg.num_heads, max_position_embeddings=2048)
    random_checkpoint(out_dir, config, tokenizer, seed=cfg.seed)


def train_argv(cfg: DemoConfig, init_dir: Path, train_file: Path, out_dir: Path) -> list[str]:
    return ["train", "--model", str(init_dir), "--data", str(train_file), "--output", str(out_dir),
            "--max-steps", str(cfg.max_steps), "--learning-rate", str(cfg.learning_rate),
            "--lr-scheduler", "cosine", "--warmup-ratio", str(cfg.warmup_ratio),
            "--weight-decay", "0.05", "--max-grad-norm", "1.0",
            "--batch-size", "1", "--grad-accum", str(cfg.rows_per_step),
            "--max-row-tokens", str(cfg.max_row_tokens), "--no-gradient-checkpointing", "--cpu",
            "--logging-steps", "10", "--save-steps", str(max(50, cfg.max_steps // 4)),
            "--save-dtype", "float32", "--seed", str(cfg.seed)]


def eval_argv(cfg: DemoConfig, model_dir: Path, eval_file: Path, out_dir: Path) -> list[str]:
    return ["eval", "--model", str(model_dir), "--benchmark", "modeq", "--data", f"modeq={eval_file}",
            "--mode", "parathinker", "--paths", ",".join(map(str, cfg.paths)),
            "--samples", str(cfg.samples), "--max-path-tokens", str(cfg.max_path_tokens),
            "--max-summary-tokens", str(cfg.max_summary_tokens),
            "--min-finished-paths", str(max(cfg.paths)),  # above P means P: every path is waited for
            "--temperature", str(cfg.temperature), "--top-p", "1.0", "--seed", str(cfg.seed),
            "--device", "cpu", "--dtype", "float32", "--output", str(out_dir), "--resume"]


HISTORY_TRIES = range(3, 8)  # the page's "what did not work first": the saving of each per-path budget


def token_counter(model_dir: Path) -> Callable[[str], int]:
    """The number of tokens the model's tokenizer makes of a text (no special tokens)."""
    from parathinker.model import load_tokenizer

    tok = load_tokenizer(model_dir)
    return lambda text: len(tok.encode(text, add_special_tokens=False))


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with `n` intra-op threads, whatever the machine's core count; restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def float_environment() -> dict[str, Any]:
    """What the run's float results depend on besides the seeds and `DemoConfig.threads`: torch's
    version and the vector kernels it picked for this CPU (AVX-512 and AVX2 round differently:
    the loss at step 10 moves in its 8th digit)."""
    import torch

    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def _jsonl(path: Path) -> list[Any]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _finished(eval_dir: Path) -> bool:
    runs = _jsonl(eval_dir / "runs.jsonl")
    return bool(runs) and runs[-1]["status"] == "finished" and (eval_dir / "summary.json").exists()


def install_model(trained: Path, model: Path, eval_dir: Path) -> Path:
    """Copy the trained model to `model` unless it is already there. A model from another run
    (the committed one, in a fresh clone) is replaced, and any evaluation of it dropped."""
    weights = model / "model.safetensors"
    if not (weights.exists() and filecmp.cmp(weights, trained / "model.safetensors", shallow=False)):
        shutil.rmtree(model, ignore_errors=True)
        shutil.rmtree(eval_dir, ignore_errors=True)
        shutil.copytree(trained, model, ignore=shutil.ignore_patterns("checkpoint-*"))
    return model


def run_demo(cfg: DemoConfig, output: Path, log: Any = print) -> list[dict[str, Any]]:
    """Data, initial checkpoint, training, evaluation, report. Resumes: finished steps are kept.
    Everything runs on `cfg.threads` CPU threads, so the numbers do not depend on the machine's
    core count."""
    with torch_threads(cfg.threads):
        return _run_demo(cfg, output, log)


def _run_demo(cfg: DemoConfig, output: Path, log: Any) -> list[dict[str, Any]]:
    work = output / "work"
    data = work / "data"
    if not (data / "eval.jsonl").exists():
        files = build(data, cfg.seed, cfg.num_train, cfg.tries, cfg.num_held_out, cfg.max_train_paths,
                      cfg.agreement_share)
        log(f"wrote {cfg.num_train} teacher samples to {files['train']} and the held-out problems "
            f"to {files['eval']}")
    init, trained = work / "init", work / "train"
    if not (init / "config.json").exists():
        make_initial_checkpoint(cfg, data / "train.jsonl", init)
        log(f"wrote a random initial checkpoint to {init}")
    if not (trained / "model.safetensors").exists():
        _run(train_argv(cfg, init, data / "train.jsonl", trained) + (["--resume"] if trained.exists() else []), log)
    model = install_model(trained, output / "model", work / "eval")
    if not _finished(work / "eval"):  # re-rendering the page does not add an empty eval run
        _run(eval_argv(cfg, model, data / "eval.jsonl", work / "eval"), log)

    summary = json.loads((work / "eval" / "summary.json").read_text())["summary"]["modeq"]
    records = _jsonl(work / "eval" / "samples.jsonl")
    problems = read_jsonl(data / "eval.jsonl")  # as `parathinker eval` read them
    claims = check_claims(summary, records, cfg.paths)
    teacher = teacher_accuracy(cfg, problems)
    for name in ("report.md", "accuracy_vs_paths.png", "summary.json"):
        shutil.copy(work / "eval" / name, output / name)
    metrics = _jsonl(model / "metrics.jsonl")  # the training of the model the page describes
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    floor = entropy_floor(data / "train.jsonl", model)
    breakdown = {p: summary_breakdown(records, p) for p in cfg.paths}
    env = float_environment()
    savings = {t: teacher_agreement_saving(problems, t, token_counter(model)) for t in HISTORY_TRIES}
    num_cut = sum(any(s.cut) for s in read_samples(data / "train.jsonl")[0])  # cut by agreement
    page = render(cfg, summary, claims, records, teacher, metrics, vocab, breakdown, floor, output, env,
                  savings, num_cut)
    (output / "README.md").write_text(page)
    (output / "demo_config.json").write_text(json.dumps({**asdict(cfg), "environment": env}, indent=1) + "\n")
    return claims
