"""Command line of the SFT pipeline: `train`, `build-data`, `convert-reference`.

    python -m parathinker.train.cli build-data --teacher MODEL_OR_URL --problems p.jsonl \\
        --output data.jsonl --traces-per-problem 8 --paths 4
    python -m parathinker.train.cli train --model BASE --data data.jsonl --output runs/x
    accelerate launch --config_file fsdp.yaml -m parathinker.train.cli train ...

`parathinker.cli` wires the same `add_*_args` / `run_*` pairs into `parathinker <command>`.
Only argparse is imported here; torch, transformers and accelerate load inside `run_*`.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from parathinker.extras import exits_for_missing_extra

if TYPE_CHECKING:
    from parathinker.train.trainer import TrainConfig


def _bool_flag(p: argparse.ArgumentParser, name: str, default: bool, help: str) -> None:
    p.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=default, help=help)


def _template_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-template", default=None,
                   help="prompt template with {question} (default: SPEC §3's)")
    p.add_argument("--summary-template", default=None,
                   help="summary template forced at inference (default: SPEC §3's)")


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after every help text with a default worth stating (not None/False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.required:
            return action.help
        return super()._get_help_string(action)


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.formatter_class = _DefaultsHelp
    p.add_argument("--model", required=True, help="base or ParaThinker checkpoint (directory or hub id)")
    p.add_argument("--data", required=True, nargs="+",
                   help="JSONL file(s) of {question, paths, summary} samples and/or reference rows "
                        "(make them from a problems file with `parathinker build-data`)")
    p.add_argument("--output", required=True,
                   help="output directory (checkpoints, metrics.jsonl, the final model)")
    p.add_argument("--epochs", type=int, default=3, help="passes over the data")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--learning-rate", type=float, default=1e-5, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.05,
                   help="AdamW weight decay (none on biases and norm weights)")
    p.add_argument("--max-grad-norm", type=float, default=0.5, help="gradient clipping norm")
    p.add_argument("--lr-scheduler", default="constant", choices=["constant", "linear", "cosine"],
                   help="learning-rate schedule after warmup")
    p.add_argument("--warmup-ratio", type=float, default=0.0,
                   help="fraction of the steps with a linear warmup")
    p.add_argument("--batch-size", type=int, default=1, help="rows per process per micro-batch")
    p.add_argument("--grad-accum", type=int, default=16,
                   help="micro-batches per optimizer step (a step takes processes x this x "
                        "--batch-size rows)")
    p.add_argument("--max-row-tokens", type=int, default=28672, help="maximum tokens of one row")
    _bool_flag(p, "pack", True, "pack several short samples into one row")
    _bool_flag(p, "shuffle-paths", True, "shuffle the path indices of every sample")
    p.add_argument("--extend-prob", type=float, default=0.3,
                   help="probability of relabelling two paths to the highest path indices")
    p.add_argument("--num-path-tokens", type=int, default=8,
                   help="<think1>..<thinkN> to have in the tokenizer (missing ones are added)")
    p.add_argument("--seg-init-std", type=float, default=0.02,
                   help="std of the random seg tables given to a base model (0: keep zeros)")
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "bf16", "fp16", "no"],
                   help="auto: bf16 on CUDA, none on CPU")
    _bool_flag(p, "gradient-checkpointing", True, "recompute each layer in the backward pass")
    p.add_argument("--attention", default="auto", choices=["auto", "flex", "sdpa"],
                   help="auto: flex on CUDA, sdpa (dense mask) on CPU")
    p.add_argument("--compile", default="auto", choices=["auto", "yes", "no"],
                   help="torch.compile the layers and the block mask (auto: CUDA with flex)")
    p.add_argument("--loss-chunk-tokens", type=int, default=4096,
                   help="target positions per chunk of the cross-entropy (bounds the logits' memory)")
    p.add_argument("--cpu", action="store_true", help="train on CPU even if CUDA is available")
    p.add_argument("--logging-steps", type=int, default=1,
                   help="optimizer steps per line of metrics.jsonl")
    p.add_argument("--save-steps", type=int, default=100, help="optimizer steps between checkpoints")
    p.add_argument("--save-total-limit", type=int, default=2, help="checkpoints kept (0: all)")
    p.add_argument("--save-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="dtype of the final model (auto: bfloat16 if trained in bf16)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    p.add_argument("--resume-from", default=None, help="continue from this checkpoint directory")
    p.add_argument("--seed", type=int, default=42,
                   help="seed of the row plan, the path shuffling and the seg-table init")
    p.add_argument("--skip-invalid", action="store_true", help="drop invalid lines (and count them)")
    _template_args(p)
    _bool_flag(p, "prepend-summary-template", True,
               "prepend the summary template to summaries that do not start with it")


def train_config(args: argparse.Namespace) -> TrainConfig:
    from parathinker.train.trainer import TrainConfig

    extra = {k: v for k, v in (("prompt_template", args.prompt_template),
                               ("summary_template", args.summary_template)) if v is not None}
    return TrainConfig(
        model=args.model, data=tuple(args.data), output=args.output, epochs=args.epochs,
        max_steps=args.max_steps, learning_rate=args.learning_rate, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, lr_scheduler=args.lr_scheduler,
        warmup_ratio=args.warmup_ratio, batch_size=args.batch_size, grad_accum=args.grad_accum,
        max_row_tokens=args.max_row_tokens, pack_samples=args.pack, shuffle_paths=args.shuffle_paths,
        extend_prob=args.extend_prob, num_path_tokens=args.num_path_tokens,
        seg_init_std=args.seg_init_std,
        mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
        attention=args.attention, compile=args.compile, loss_chunk_tokens=args.loss_chunk_tokens,
        cpu=args.cpu, logging_steps=args.logging_steps, save_steps=args.save_steps,
        save_total_limit=args.save_total_limit or None, save_dtype=args.save_dtype,
        resume=args.resume, resume_from=args.resume_from, seed=args.seed,
        skip_invalid=args.skip_invalid, prepend_summary_template=args.prepend_summary_template,
        **extra)


def run_train(args: argparse.Namespace) -> int:
    from parathinker.train.trainer import train

    from accelerate import PartialState

    out = train(train_config(args))
    if PartialState().is_main_process:  # under `accelerate launch`: once, not once per process
        print(f"done: {out} (metrics in {out / 'metrics.jsonl'})")
    return 0


def _paths_range(text: str) -> tuple[int, int]:
    try:
        lo, _, hi = text.partition("-")
        lo_i, hi_i = int(lo), int(hi or lo)
    except ValueError:
        msg = f"--paths takes P or A-B (e.g. 4 or 2-6), got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    return lo_i, hi_i


def add_build_data_args(p: argparse.ArgumentParser) -> None:
    from parathinker.cli_args import add_failover_args, add_model_args, add_sampling_args

    add_model_args(p, model_flag="--teacher",
                   model_help="local checkpoint (directory or hub id), or OpenAI-compatible base "
                              "URL(s): one, a comma list, or a file of URLs (one a line), spread by "
                              "load (the other model flags apply to a local teacher only)")
    p.add_argument("--problems", required=True, help='JSONL of {"id", "problem", "answer"}')
    p.add_argument("--output", required=True, help="output JSONL of samples")
    p.add_argument("--traces-per-problem", type=int, default=8,
                   help="teacher traces sampled per problem (the pool the paths are drawn from)")
    p.add_argument("--paths", type=_paths_range, default=(4, 4),
                   help="paths per sample: P, or A-B to draw P per sample")
    p.add_argument("--samples-per-problem", type=int, default=1,
                   help="training samples drawn per problem, each from its own traces")
    p.add_argument("--select", default="any-correct", choices=["any-correct", "all-correct", "all"],
                   help="any-correct: at least one correct path; all-correct: every path; all: no check")
    p.add_argument("--include-truncated", action="store_true",
                   help="also use traces cut by --max-tokens")
    p.add_argument("--path-text", default="full", choices=["full", "thinking"],
                   help="full trace, or only the thinking before </think>")
    p.add_argument("--summary-format", default=" \\boxed{{{answer}}}.",
                   help="summary text after the template; {answer} is the problem's answer")
    p.add_argument("--teacher-mode", default="sequential", choices=["sequential", "paths"],
                   help="local teacher: plain traces, or N paths of one ParaThinker request")
    p.add_argument("--api", default="chat", choices=["chat", "completions"], help="endpoint API")
    p.add_argument("--teacher-model", default=None, help="endpoint model name")
    p.add_argument("--api-key", default=None, help="endpoint key (default $OPENAI_API_KEY)")
    p.add_argument("--prompt-template", default=None,
                   help="teacher prompt with {question} (local sequential, endpoint completions)")
    p.add_argument("--max-tokens", type=int, default=16384, help="token budget of one trace")
    add_sampling_args(p, temperature=0.6, top_p=0.95, top_k=None, seed=0,
                      seed_help="base seed of the teacher's traces (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="problems per engine call")
    p.add_argument("--concurrency", type=int, default=8,
                   help="endpoint requests in flight per teacher (default 8)")
    p.add_argument("--traces-per-request", type=int, default=None,
                   help="endpoint: traces (n) per request; 1 for servers that refuse n > 1 "
                        "(default: all of a problem's missing traces)")
    add_failover_args(p, "teacher")
    p.add_argument("--limit", type=int, default=None, help="first N problems only")


def run_build_data(args: argparse.Namespace) -> int:
    from parathinker.train.build_data import BuildConfig, build_data

    extra = {"prompt_template": args.prompt_template} if args.prompt_template else {}
    cfg = BuildConfig(
        teacher=args.teacher, problems=args.problems, output=args.output,
        traces_per_problem=args.traces_per_problem, min_paths=args.paths[0], max_paths=args.paths[1],
        samples_per_problem=args.samples_per_problem, select=args.select,
        include_truncated=args.include_truncated, path_text=args.path_text,
        summary_format=args.summary_format, teacher_mode=args.teacher_mode, api=args.api,
        teacher_model=args.teacher_model, api_key=args.api_key, max_tokens=args.max_tokens,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
        concurrency=args.concurrency, traces_per_request=args.traces_per_request,
        server_retries=args.server_retries, request_timeout=args.request_timeout, device=args.device,
        dtype=args.dtype, rope_scaling=args.rope_scaling, layout=args.layout, linear=args.linear, attention=args.attention,
        compile=args.compile, allow_pickle=args.allow_pickle, limit=args.limit, **extra)
    from parathinker.client.endpoints import EndpointError

    try:
        stats = build_data(cfg)
    except EndpointError as e:
        print(f"error: {e}\ntraces finished so far are kept in {args.output}.traces/samples.jsonl; "
              "rerun the same command to continue", file=sys.stderr)
        return 1
    print(f"wrote {stats['samples']} samples to {args.output} ({stats['traces']} traces, "
          f"{stats['correct_traces']} correct; {stats['problems_without_sample']} problems without a sample)")
    if stats["samples"] == 0:
        kept = "kept" if args.include_truncated else "rejected (add --include-truncated to keep them)"
        print(f"error: no usable sample was produced. Of {stats['traces']} traces, "
              f"{stats['correct_traces']} were graded correct, {stats['truncated_traces']} hit "
              f"--max-tokens ({kept}), {stats['empty_traces']} were empty; --select "
              f"{args.select} needs, per problem, enough usable traces for --paths "
              f"{args.paths[0]}-{args.paths[1]}. Raise --max-tokens or --traces-per-problem, "
              "or loosen --select", file=sys.stderr)
        return 1
    return 0


def add_convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="JSONL of reference rows (input_ids, attention_mask)")
    p.add_argument("--output", required=True, help="output JSONL of {question, paths, summary}")
    p.add_argument("--tokenizer", required=True, help="checkpoint whose tokenizer made the rows")
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip rows that do not split into prompt, paths and summary (and count them)")
    _template_args(p)


def run_convert(args: argparse.Namespace) -> int:
    from parathinker.model import load_tokenizer, resolve_model_dir
    from parathinker.spec.tokens import ControlTokens
    from parathinker.train.data import (SampleError, TextFormat, iter_jsonl, split_reference_row,
                                        token_sample_to_text, write_samples)

    tokenizer = load_tokenizer(resolve_model_dir(args.tokenizer))
    ctrl = ControlTokens.from_tokenizer(tokenizer)
    fmt = TextFormat(**{k: v for k, v in (("prompt_template", args.prompt_template),
                                          ("summary_template", args.summary_template)) if v})
    samples, skipped = [], 0
    for where, row in iter_jsonl(args.input):
        try:
            if isinstance(row, SampleError):
                raise row
            if not isinstance(row, dict) or "input_ids" not in row or "attention_mask" not in row:
                raise SampleError(f"{where}: not a reference row (needs input_ids and attention_mask)")
            ts = split_reference_row(row["input_ids"], row["attention_mask"], ctrl, where)
            samples.append(token_sample_to_text(ts, tokenizer, fmt))
        except SampleError:
            if not args.skip_invalid:
                raise
            skipped += 1
    write_samples(args.output, samples)
    print(f"wrote {len(samples)} samples to {args.output}" + (f" ({skipped} skipped)" if skipped else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="parathinker-train", description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_args(sub.add_parser("train", help="supervised fine-tuning", allow_abbrev=False))
    add_build_data_args(sub.add_parser("build-data", help="SFT data from a teacher", allow_abbrev=False))
    add_convert_args(sub.add_parser("convert-reference", help="reference rows -> JSONL samples",
                                    allow_abbrev=False))
    args = parser.parse_args(argv)
    run = {"train": run_train, "build-data": run_build_data, "convert-reference": run_convert}
    if exits_for_missing_extra(args.command, args):
        return 2
    try:
        return run[args.command](args)
    except (ValueError, FileNotFoundError) as e:  # SampleError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
