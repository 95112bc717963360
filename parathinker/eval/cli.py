"""`parathinker eval`: accuracy of ParaThinker and its baselines on math benchmarks.

    parathinker eval --model Leslie04/ParaThinker-1.5B --benchmark aime24,aime25,amc23,math500 \\
        --mode parathinker --paths 2,4,8 --samples 8 --output runs/card
    python -m parathinker.eval.cli --model ./ckpt --benchmark amc23 --mode sequential --output runs/x

Writes into --output: samples.jsonl (one line per finished sample, appended at once), runs.jsonl
(one line per invocation: settings, commit, machine), summary.json, report.md and
accuracy_vs_paths.png. An interrupted run continues with --resume. See docs/EVAL.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from parathinker.cli_args import (add_failover_args, add_gating_args, add_model_args,
                                  add_path_budget_args, add_sampling_args, comma_ints)
from parathinker.extras import exits_for_missing_extra


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def add_eval_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, model_help="checkpoint directory or hub id; with --endpoint, the served model "
                                 "name (the other model flags apply to the project's engine only)",
                   layout_list=True)
    g = p.add_argument_group("what to evaluate")
    g.add_argument("--benchmark", type=_names, default=None,
                   help="comma list of aime24, aime25, amc23, math500 or custom names (with --data); "
                        "default: the names of the --data entries (NAME=FILE, or a plain FILE's "
                        "stem), else aime24")
    g.add_argument("--data", action="append", default=None, metavar="[NAME=]FILE",
                   help="JSONL file of {id, problem, answer} records: NAME=FILE for the --benchmark NAME, "
                        "or plain FILEs, one per --benchmark name in order; repeatable (default: the "
                        "built-in files, else the hub)")
    g.add_argument("--mode", type=_names, default=("parathinker",),
                   help="comma list of parathinker, sequential, majority (default parathinker)")
    g.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    g = p.add_argument_group("protocol")
    g.add_argument("--paths", type=comma_ints, default=(2, 4, 8),
                   help="parathinker mode: comma list of path counts P, each run in turn (default 2,4,8)")
    g.add_argument("--majority-n", type=comma_ints, default=None,
                   help="majority mode: comma list of N for maj@N over N sequential traces "
                        "(default: the --paths values, i.e. the same total budget as P paths)")
    g.add_argument("--samples", type=int, default=1,
                   help="K independent samples per problem and configuration; pass@1 = mean over them "
                        "(for majority: K independent votes of N traces each). Default 1")
    add_path_budget_args(g, max_path_tokens=16384, min_path_tokens=None)
    g = p.add_argument_group("gated thinking (each value of a list is a configuration, run in turn "
                             "with the same seeds)")
    add_gating_args(g, lists=True,
                    agreement_note="values above a configuration's P are not run for it")
    g.add_argument("--max-tokens", type=int, default=None,
                   help="sequential mode: budget of the trace (default 2 x --max-path-tokens = 32768)")
    g.add_argument("--majority-max-tokens", type=int, default=None,
                   help="majority mode: budget of each trace (default --max-path-tokens)")
    add_sampling_args(g, temperature=0.5, seed=0,
                      seed_help="base seed; each sample's seed is derived from it and the sample's "
                                "key (default: %(default)s)")
    g = p.add_argument_group("output")
    g.add_argument("--output", required=True, help="directory for samples.jsonl and the report")
    g.add_argument("--resume", action="store_true",
                   help="continue the run stored in --output: finished samples are kept and skipped")
    g.add_argument("--save-text", action="store_true",
                   help="also store every path's / trace's full text (large)")
    g = p.add_argument_group("backend")
    g.add_argument("--endpoint", action="append", default=None, metavar="URL[,URL...]|FILE",
                   help="OpenAI-compatible server(s) instead of the engine: parathinker serve for "
                        "parathinker mode, vLLM/SGLang/... for sequential and majority, e.g. "
                        "http://127.0.0.1:8000/v1; repeatable, comma-separated, or a file of URLs "
                        "(one a line); work is spread by load (default: none, the project's engine)")
    g.add_argument("--api-key", default=None, help="for --endpoint (default $OPENAI_API_KEY, else none)")
    g.add_argument("--batch-size", type=int, default=64,
                   help="requests in flight at once (engine batch / HTTP concurrency); default 64")
    g.add_argument("--concurrency", type=int, default=None,
                   help="with --endpoint: requests in flight per server, a free slot takes the next "
                        "sample (default: --batch-size)")
    add_failover_args(g)


def benchmark_names(benchmark: tuple[str, ...] | None, data: list[str] | None) -> tuple[str, ...]:
    """--benchmark as given; without it, one name per --data entry (NAME=FILE: NAME; a plain FILE:
    its stem, so that results are never labelled with a benchmark they are not); else aime24."""
    if benchmark:
        return tuple(benchmark)
    if data:
        return tuple(d.split("=", 1)[0] if "=" in d else Path(d).stem for d in data)
    return ("aime24",)


def config_from_args(args: argparse.Namespace) -> object:
    from parathinker.eval.config import EvalConfig

    return EvalConfig(
        model=args.model, output=args.output, benchmarks=benchmark_names(args.benchmark, args.data),
        data=tuple(args.data or ()),
        modes=tuple(args.mode), paths=tuple(args.paths), majority_n=tuple(args.majority_n or ()),
        layouts=tuple(args.layout),
        samples=args.samples, max_path_tokens=args.max_path_tokens, max_summary_tokens=args.max_summary_tokens,
        min_finished_paths=args.min_finished_paths, stop_on_agreement=tuple(args.stop_on_agreement),
        prune_confidence=tuple(args.prune_confidence), confidence_window=args.confidence_window,
        confidence_top_k=args.confidence_top_k, max_tokens=args.max_tokens,
        majority_max_tokens=args.majority_max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed, resume=args.resume, limit=args.limit,
        endpoint=",".join(args.endpoint) if args.endpoint else None, request_timeout=args.request_timeout,
        batch_size=args.batch_size, concurrency=args.concurrency, server_retries=args.server_retries,
        device=args.device,
        dtype=args.dtype, rope_scaling=args.rope_scaling, linear=args.linear, attention=args.attention,
        compile=args.compile,
        allow_pickle=args.allow_pickle, save_text=args.save_text,
        api_key=args.api_key or os.environ.get("OPENAI_API_KEY"))


def _sigterm_interrupts() -> Any:
    """SIGTERM (a scheduler's or `kill`'s stop) ends the run as Ctrl-C does: finished samples
    kept and an "interrupted" line in runs.jsonl. Returns the previous handler (None when not
    on the main thread, where Python cannot install one)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, interrupt)


def run_eval(args: argparse.Namespace) -> int:
    """0 on success; 2 for bad input (nothing run); 1 when the run failed midway (samples kept)."""
    from parathinker.eval.backends import EndpointError
    from parathinker.eval.runner import print_table, run

    previous = _sigterm_interrupts()
    try:
        cfg = config_from_args(args)
        summary = run(cfg)  # type: ignore[arg-type]
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except EndpointError as e:
        print(f"error: {e}\nsamples finished so far are kept in {args.output}/samples.jsonl; "
              "rerun with --resume to continue", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished samples are kept in {args.output}/samples.jsonl; "
              "rerun with --resume to continue", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print_table(summary)
    print(f"report: {os.path.join(args.output, 'report.md')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="parathinker eval", description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
    add_eval_args(parser)
    args = parser.parse_args(argv)
    return 2 if exits_for_missing_extra("eval", args) else run_eval(args)


if __name__ == "__main__":
    sys.exit(main())
