"""Command line: `parathinker generate|eval|train|build-data|convert-reference|serve ...`.

    parathinker generate --model Leslie04/ParaThinker-1.5B --paths 4 "What is 1+1?"
    parathinker eval --model M --benchmark aime24 --paths 1,2,4,8 --output runs/aime24
    parathinker build-data --teacher M --problems problems.jsonl --output data.jsonl
    parathinker train --model BASE --data data.jsonl --output ckpt
    parathinker serve --model M --port 8000

Each subcommand's flags: `parathinker <command> --help`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

from parathinker.cli_args import (GATING_FIELDS, HelpFormatter, add_gating_args, add_model_args,
                                  add_path_budget_args, add_sampling_args, llm_kwargs, rope_for_args)
from parathinker.config import SamplingParams
from parathinker.engine.confidence import check_ungated
from parathinker.engine.outputs import PathOutput
from parathinker.extras import MissingExtra, check_command


def add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("question", help="the question (the prompt template of SPEC §3 is applied)")
    add_model_args(p)
    g = p.add_argument_group("request")
    g.add_argument("--paths", type=int, default=4, help="number of parallel paths P (default: %(default)s)")
    add_path_budget_args(g, max_path_tokens=16384)
    add_sampling_args(g, temperature=0.5)
    add_gating_args(g, agreement_note="at most --paths")
    p.add_argument("--json", action="store_true",
                   help="print the whole output (paths with their finish reasons, confidences and "
                        "answers, summary, token ids) as JSON")


def generate_params(args: argparse.Namespace) -> SamplingParams:
    """`generate`'s request from its flags; SamplingParams' own checks raise for a bad one, and
    `check_ungated` for gating flags with --layout reference (SPEC §6 has no gating)."""
    params = SamplingParams(
        num_paths=args.paths, max_path_tokens=args.max_path_tokens,
        min_path_tokens=args.min_path_tokens, max_summary_tokens=args.max_summary_tokens,
        min_finished_paths=min(args.min_finished_paths, max(args.paths, 1)), temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, seed=args.seed,
        **{name: getattr(args, name) for name in GATING_FIELDS})
    if args.layout == "reference":
        check_ungated(params)
    return params


def run_generate(args: argparse.Namespace) -> int:
    from parathinker.spec.budgets import fit_path_args

    generate_params(args)  # a bad flag fails now, not after torch, the tokenizer or a download load
    fit_path_args(args, args.question)  # before the rope scaling is resolved from it
    params = generate_params(args)
    from parathinker import LLM

    rope = rope_for_args(args, args.model, args.max_path_tokens)  # YaRN for 16K paths (SPEC §5.6)
    llm = LLM(args.model, **llm_kwargs(args, rope))
    start = time.perf_counter()
    (out,) = llm.generate([args.question], params)
    elapsed = time.perf_counter() - start
    if args.json:
        print(json.dumps(out.to_dict(), ensure_ascii=False, indent=2))
        return 0
    for p in out.paths:
        print(f"===== path {p.index} ({path_facts(p)}) =====")
        print(p.text)
    print(f"===== summary ({len(out.summary.token_ids)} tokens, {out.summary.finish_reason}) =====")
    print(out.summary.text)
    print(f"===== answer: {out.answer}")
    generated = out.num_path_tokens + len(out.summary.token_ids)
    print(f"prompt {len(out.prompt_token_ids)} tokens | paths {out.num_path_tokens} tokens | "
          f"summary {len(out.summary.token_ids)} tokens | {elapsed:.2f} s | "
          f"{generated / elapsed:.1f} tokens/s")
    return 0


def path_facts(p: PathOutput) -> str:
    """"12 tokens, end, confidence 1.234, answer 7": a path's confidence and answer where it has one."""
    facts = [f"{len(p.token_ids)} tokens", p.finish_reason]
    if p.confidence is not None:
        facts.append(f"confidence {p.confidence:.3f}")
    if p.answer is not None:
        facts.append(f"answer {p.answer}")
    return ", ".join(facts)


COMMANDS = {  # name -> (module, add_args, run, one line)
    "generate": ("parathinker.cli", "add_generate_args", "run_generate",
                 "answer one question with P parallel paths"),
    "eval": ("parathinker.eval.cli", "add_eval_args", "run_eval",
             "accuracy on math benchmarks (parathinker / sequential / majority)"),
    "build-data": ("parathinker.train.cli", "add_build_data_args", "run_build_data",
                   "SFT samples from a teacher model or endpoint"),
    "train": ("parathinker.train.cli", "add_train_args", "run_train",
              "supervised fine-tuning for native parallel thinking"),
    "convert-reference": ("parathinker.train.cli", "add_convert_args", "run_convert",
                          "reference pre-tokenized rows -> JSONL samples"),
    "serve": ("parathinker.serve.cli", "add_serve_args", "run_serve", "OpenAI-compatible server"),
}


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand, its flags described and their defaults shown."""
    # Subcommand modules are imported here, not at the top: `parathinker generate` should not pay
    # for FastAPI, and `parathinker serve` should not need the training extras.
    parser = argparse.ArgumentParser(prog="parathinker", description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, add_args, _, help_text) in COMMANDS.items():
        add = getattr(importlib.import_module(module), add_args)
        add(sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False,
                           formatter_class=HelpFormatter))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module, _, run, _ = COMMANDS[args.command]
    try:
        check_command(args.command, args)
        return getattr(importlib.import_module(module), run)(args)
    except (ValueError, FileNotFoundError, MissingExtra) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
