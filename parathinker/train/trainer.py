"""SFT of a ParaThinker model: an explicit accelerate loop, so that one script runs on a CPU, one
GPU, or many GPUs and nodes under `accelerate launch` (DDP, FSDP, DeepSpeed ZeRO from an
accelerate config).

    from parathinker.train.trainer import TrainConfig, train
    train(TrainConfig(model="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", data=("data.jsonl",),
                      output="runs/pt-1.5b"))

Each optimizer step: `grad_accum` micro-batches of `batch_size` packed rows per process (rows
from `StepPlan`), loss = summed token cross-entropy / number of target tokens of the whole step
(all processes), gradient clipping, AdamW, the LR schedule. Every logged step appends
{"step", "epoch", "loss", "learning_rate", "grad_norm", "num_tokens", ...} to
<output>/metrics.jsonl. Checkpoints (`checkpoints.py`) are engine-loadable; `resume=True`
continues from the newest one, and the final model is written to <output> itself.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from parathinker.model import load_model, load_tokenizer, resolve_model_dir
from parathinker.model.decoder import ParaThinkerForCausalLM
from parathinker.spec.tokens import (DEFAULT_PROMPT_TEMPLATE, DEFAULT_SUMMARY_TEMPLATE, ControlTokens,
                                add_parathinker_tokens)
from parathinker.train import checkpoints as ckpts
from parathinker.train.data import Limits, SampleEncoder, TextFormat, TokenSample, load_token_samples
from parathinker.train.launch import short_epoch_warning, single_process_launch_warning
from parathinker.train.loss import TrainForward
from parathinker.train.pack import PackOptions, collate, make_row
from parathinker.train.plan import StepPlan

SCHEDULERS = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    model: str  # base or ParaThinker checkpoint (directory or hub id)
    data: tuple[str, ...]  # JSONL files: text samples and/or reference rows
    output: str
    # the reference recipe (LLaMA-Factory, 4 GPUs): lr 1e-5, 3 epochs, batch 1 x accum 16,
    # weight decay 0.05, grad clip 0.5, bf16, gradient checkpointing, rows of 28672 tokens
    epochs: int = 3
    max_steps: int | None = None  # overrides epochs
    learning_rate: float = 1e-5
    weight_decay: float = 0.05
    max_grad_norm: float = 0.5
    lr_scheduler: str = "constant"  # the reference's "constant" (HF ignores its warmup ratio)
    warmup_ratio: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    batch_size: int = 1  # rows per process per micro-batch
    grad_accum: int = 16
    max_row_tokens: int = 28672
    pack_samples: bool = True  # several short samples per row
    shuffle_samples: bool = True
    shuffle_paths: bool = True
    extend_prob: float = 0.3  # extensible-token augmentation (the reference: 0.3)
    num_path_tokens: int = 8  # <think1>..<thinkN> added to the tokenizer if missing
    seg_init_std: float = 0.02  # seg tables of a base model start ~ N(0, std)
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, none on CPU) | bf16 | fp16 | no
    gradient_checkpointing: bool = True
    attention: str = "auto"  # auto (flex on CUDA, sdpa on CPU) | flex | sdpa
    compile: str = "auto"  # auto (on CUDA with flex) | yes | no: torch.compile layers + mask
    loss_chunk_tokens: int = 4096
    cpu: bool = False  # train on CPU even if CUDA is there
    logging_steps: int = 1
    save_steps: int = 100
    save_total_limit: int | None = 2
    save_dtype: str = "auto"  # final model: auto (bf16 if trained in bf16) | float32 | bfloat16
    resume: bool = False  # continue from the newest checkpoint in `output`
    resume_from: str | None = None  # or from this checkpoint directory
    seed: int = 42
    skip_invalid: bool = False
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    summary_template: str = DEFAULT_SUMMARY_TEMPLATE
    prepend_summary_template: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 0, "epochs must be >= 0"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1"),
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (self.max_row_tokens >= 8, "max_row_tokens must be >= 8"),
            (0 <= self.extend_prob <= 1, "extend_prob must be in [0, 1]"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (self.lr_scheduler in SCHEDULERS, f"lr_scheduler must be one of {SCHEDULERS}"),
            (self.mixed_precision in ("auto", "bf16", "fp16", "no"), "mixed_precision: auto|bf16|fp16|no"),
            (self.attention in ("auto", "flex", "sdpa"), "attention: auto|flex|sdpa"),
            (self.compile in ("auto", "yes", "no"), "compile: auto|yes|no"),
            (self.save_dtype in ("auto", "float32", "bfloat16"), "save_dtype: auto|float32|bfloat16"),
            (self.save_steps >= 1 and self.logging_steps >= 1,
             "save_steps and logging_steps must be >= 1"),
            (self.num_path_tokens >= 1, "num_path_tokens must be >= 1"),
            (bool(self.data), "no data files"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


def prepare_model(model: ParaThinkerForCausalLM, tokenizer: Any, num_path_tokens: int,
                  seg_init_std: float, seed: int) -> dict[str, Any]:
    """Add missing ParaThinker tokens (growing the embeddings) and give a base model's all-zero
    seg tables small random values (SPEC §1). Returns what was done."""
    added = add_parathinker_tokens(tokenizer, model, num_paths=num_path_tokens)
    tables = [layer.self_attn.seg_embeddings.weight for layer in model.model.layers]
    is_base = all(not t.any() for t in tables)
    if is_base and seg_init_std > 0:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for t in tables:
                t.copy_(torch.randn(t.shape, generator=gen) * seg_init_std)
    return {"added_tokens": added, "initialised_seg_tables": is_base and seg_init_std > 0,
            "vocab_size": model.vocab_size}


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """LR multiplier before optimizer step `step` (0-based), as transformers' schedules."""
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and norm weights (1-D tensors), as the HF Trainer."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _resolve_resume(cfg: TrainConfig, output: Path) -> Path | None:
    if cfg.resume_from:
        ckpts.read_trainer_state(cfg.resume_from)  # a clear error if incomplete
        return Path(cfg.resume_from)
    latest = ckpts.latest_checkpoint(output)
    if cfg.resume:
        return latest  # None: nothing to resume, start fresh
    if latest is not None:
        raise ValueError(f"{output} already holds checkpoints (newest {latest.name}); pass "
                         "--resume to continue that run, or choose another --output")
    return None


def _truncate_metrics(path: Path, last_step: int) -> None:
    """A resumed run re-logs the steps after its checkpoint: drop them from metrics.jsonl."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line from the interruption
    path.write_text("".join(s + "\n" for s in keep))


def load_data(cfg: TrainConfig, tokenizer: Any, model: ParaThinkerForCausalLM,
              log: Callable[[str], None]) -> list[TokenSample]:
    ctrl = ControlTokens.from_tokenizer(tokenizer)
    limits = Limits(cfg.max_row_tokens, min(ctrl.max_paths, model.config.max_segments - 1),
                    model.config.max_position_embeddings)
    fmt = TextFormat(cfg.prompt_template, cfg.summary_template, cfg.prepend_summary_template)
    encoder = SampleEncoder(tokenizer, fmt, limits)
    samples: list[TokenSample] = []
    for path in cfg.data:
        got, skipped = load_token_samples(path, encoder, cfg.skip_invalid)
        samples += got
        if skipped:
            log(f"{path}: skipped {len(skipped)} invalid line(s) (--skip-invalid); first: {skipped[0]}")
    return samples


def resolve_runtime(cfg: TrainConfig) -> tuple[bool, str, str, bool]:
    """(use CUDA, mixed precision, attention backend, compile) for this machine."""
    use_cuda = torch.cuda.is_available() and not cfg.cpu
    mixed = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("bf16" if use_cuda else "no")
    attention = cfg.attention if cfg.attention != "auto" else ("flex" if use_cuda else "sdpa")
    if attention == "flex" and not use_cuda:
        raise ValueError("--attention flex trains on CUDA only (FlexAttention has no CPU backward); "
                         "use --attention sdpa on CPU")
    compile_ = cfg.compile == "yes" or (cfg.compile == "auto" and use_cuda and attention == "flex")
    return use_cuda, mixed, attention, compile_


def build_model(cfg: TrainConfig, model_dir: Path, compile_: bool,
                log: Callable[[str], None]) -> tuple[ParaThinkerForCausalLM, Any, dict[str, Any]]:
    """The model in training mode and its tokenizer, with ParaThinker tokens and seg tables."""
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, "cpu", torch.float32)
    prep = prepare_model(model, tokenizer, cfg.num_path_tokens, cfg.seg_init_std, cfg.seed)
    if prep["added_tokens"] or prep["initialised_seg_tables"]:
        log(f"base model prepared: added {len(prep['added_tokens'])} tokens, seg tables "
            f"{'initialised' if prep['initialised_seg_tables'] else 'kept'}")
    model.train()
    model.gradient_checkpointing = cfg.gradient_checkpointing
    if compile_:
        for layer in model.model.layers:
            layer.compile()  # in place: state-dict keys stay the same
    return model, tokenizer, prep


def train(cfg: TrainConfig, on_log: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """Run (or resume) training; returns the output directory holding the final model."""
    from accelerate import Accelerator
    from tqdm import tqdm

    use_cuda, mixed, attention, compile_ = resolve_runtime(cfg)
    accelerator = Accelerator(cpu=not use_cuda, mixed_precision=mixed,
                              gradient_accumulation_steps=cfg.grad_accum)
    is_main = accelerator.is_main_process
    log = (lambda msg: print(msg, flush=True)) if is_main else (lambda msg: None)
    warn = (lambda msg: print(msg, file=sys.stderr, flush=True)) if is_main else (lambda msg: None)
    if (msg := single_process_launch_warning(os.environ, accelerator.num_processes)) is not None:
        warn(msg)
    output = Path(cfg.output)
    resume_dir = _resolve_resume(cfg, output)
    # a resumed run loads its checkpoint: same vocabulary, same shapes
    model, tokenizer, prep = build_model(cfg, resume_dir or resolve_model_dir(cfg.model), compile_, log)

    samples = load_data(cfg, tokenizer, model, log)
    accum = accelerator.gradient_accumulation_steps  # DeepSpeed's config may set it
    plan = StepPlan.build(samples, cfg.max_row_tokens, cfg.seed, cfg.epochs, cfg.max_steps,
                          accelerator.num_processes * accum * cfg.batch_size,
                          cfg.shuffle_samples, cfg.pack_samples)
    fewest_rows = min(len(rows) for rows in plan.epochs)
    if (msg := short_epoch_warning(fewest_rows, accelerator.num_processes, accum,
                                   cfg.batch_size)) is not None:
        warn(msg)
    warmup = math.ceil(cfg.warmup_ratio * plan.total_steps)
    log(f"{len(samples)} samples in {len(plan.epochs[0])} rows per epoch; {plan.total_steps} steps "
        f"of {plan.rows_per_step} rows; {accelerator.num_processes} process(es), attention "
        f"{attention}, precision {mixed}")

    fwd = TrainForward(model, attention, cfg.loss_chunk_tokens, compile_mask=compile_)
    optimizer = torch.optim.AdamW(param_groups(fwd, cfg.weight_decay), lr=cfg.learning_rate,
                                  betas=cfg.adam_betas, eps=cfg.adam_eps)
    # Stepped by hand once per optimizer step, on the torch optimizer whose param groups every
    # wrapper (DDP, FSDP, DeepSpeed) keeps using; saved and restored with the accelerate state.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, plan.total_steps, warmup, cfg.lr_scheduler))
    fwd, optimizer = accelerator.prepare(fwd, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    start, metrics = 0, output / "metrics.jsonl"
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir / "state"))
        start = ckpts.read_trainer_state(resume_dir)["step"]
        if is_main:
            _truncate_metrics(metrics, start)
        log(f"resumed from {resume_dir} at step {start}")
    if is_main:
        output.mkdir(parents=True, exist_ok=True)
        ckpts.write_json(output / "train_config.json", _config_record(cfg, prep, mixed, attention))

    ctrl = ControlTokens.from_tokenizer(tokenizer)
    opts = PackOptions(cfg.max_row_tokens, cfg.shuffle_paths, cfg.extend_prob,
                       min(ctrl.max_paths, model.config.max_segments - 1))
    # pad tokens are never seen and never targets: any id will do
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    multiple = 128 if attention == "flex" else 8

    def batch_of(micro: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        rows = [make_row(samples, plan.epochs[e][r], ctrl, opts, cfg.seed, e, r) for e, r in micro]
        return {k: v.to(accelerator.device) for k, v in collate(rows, pad_id, multiple).items()}

    bar = tqdm(total=plan.total_steps, initial=start, disable=not is_main, desc="train", unit="step")
    pending: list[dict[str, Any]] = []
    started = time.perf_counter()
    for step in range(start, plan.total_steps):
        num_targets = sum(samples[i].num_targets for e, r in plan.step_rows(step)
                          for i in plan.epochs[e][r])
        batches = (batch_of(plan.micro_batch(step, a, accelerator.process_index,
                                             accelerator.num_processes, cfg.batch_size))
                   for a in range(accum))
        lr = scheduler.get_last_lr()[0]
        pending.append(_optimizer_step(accelerator, fwd, optimizer, batches, num_targets,
                                       cfg.max_grad_norm))
        scheduler.step()
        bar.update(1)
        bar.set_postfix(loss=f"{pending[-1]['loss']:.4f}")
        done = step + 1
        if done % cfg.logging_steps == 0 or done == plan.total_steps:
            record = _log_record(pending, done, plan.epoch_progress(step), lr, started)
            pending = []
            if is_main:
                with metrics.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            if on_log is not None:
                on_log(record)
        if done % cfg.save_steps == 0 or done == plan.total_steps:
            _save_checkpoint(accelerator, fwd, tokenizer, output, done, plan, cfg,
                             _config_record(cfg, prep, mixed, attention))
    bar.close()
    _export_final(accelerator, fwd, tokenizer, output, cfg, mixed)
    log(f"final model written to {output}")
    return output


def _optimizer_step(accelerator: Any, fwd: torch.nn.Module, optimizer: Any,
                    batches: Iterable[dict[str, torch.Tensor]], num_targets: int,
                    max_grad_norm: float) -> dict[str, Any]:
    """One optimizer step over the micro-batches of this process. The loss is normalised by the
    target tokens of the whole step on all processes: DDP/FSDP/DeepSpeed average gradients over
    processes and accelerate divides by the accumulation steps, hence the factor."""
    scale = accelerator.num_processes * accelerator.gradient_accumulation_steps / num_targets
    loss_sum = torch.zeros((), device=accelerator.device)
    for batch in batches:
        # accumulate(): no gradient sync (DDP/FSDP) and no DeepSpeed step until the last one
        with accelerator.accumulate(fwd):
            loss, _ = fwd(**batch)
            accelerator.backward(loss * scale)
        loss_sum += loss.detach().float()
    assert accelerator.sync_gradients, "micro-batches out of step with accelerate's counter"
    grad_norm = accelerator.clip_grad_norm_(fwd.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss = (accelerator.reduce(loss_sum, "sum") / num_targets).item()
    return {"loss": loss, "grad_norm": None if grad_norm is None else float(grad_norm),
            "num_tokens": num_targets}


def _log_record(pending: list[dict[str, Any]], step: int, epoch: float, lr: float,
                started: float) -> dict[str, Any]:
    norms = [p["grad_norm"] for p in pending if p["grad_norm"] is not None]
    return {"step": step, "epoch": round(epoch, 4),
            "loss": sum(p["loss"] for p in pending) / len(pending),
            "learning_rate": lr, "grad_norm": sum(norms) / len(norms) if norms else None,
            "num_tokens": sum(p["num_tokens"] for p in pending),
            "elapsed_s": round(time.perf_counter() - started, 3)}


def _config_record(cfg: TrainConfig, prep: dict[str, Any], mixed: str,
                   attention: str) -> dict[str, Any]:
    resolved = {"mixed_precision": mixed, "attention": attention,
                **{k: v for k, v in prep.items() if k != "added_tokens"}}
    return {"config": asdict(cfg), "resolved": resolved}


def _save_checkpoint(accelerator: Any, fwd: torch.nn.Module, tokenizer: Any, output: Path,
                     step: int, plan: StepPlan, cfg: TrainConfig, record: dict[str, Any]) -> Path:
    final = output / f"checkpoint-{step}"
    tmp = output / f"checkpoint-{step}.tmp"
    accelerator.wait_for_everyone()
    state = accelerator.get_state_dict(fwd)  # every process: gathers FSDP / ZeRO-3 shards
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        ckpts.export_weights(state, accelerator.unwrap_model(fwd).model.config, tmp, tokenizer)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "state"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ckpts.write_json(tmp / "train_config.json", record)
        epoch = round(plan.epoch_progress(step - 1), 4)  # as metrics.jsonl's
        ckpts.write_json(tmp / ckpts.TRAINER_STATE, {"step": step, "epoch": epoch,
                                                     "total_steps": plan.total_steps})
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        ckpts.rotate(output, cfg.save_total_limit)
    accelerator.wait_for_everyone()
    return final


def _export_final(accelerator: Any, fwd: torch.nn.Module, tokenizer: Any, output: Path,
                  cfg: TrainConfig, mixed: str) -> None:
    accelerator.wait_for_everyone()
    state = accelerator.get_state_dict(fwd)
    if accelerator.is_main_process:
        kind = cfg.save_dtype if cfg.save_dtype != "auto" else ("bfloat16" if mixed == "bf16" else None)
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, None: None}[kind]
        ckpts.export_weights(state, accelerator.unwrap_model(fwd).model.config, output, tokenizer, dtype)
    accelerator.wait_for_everyone()
