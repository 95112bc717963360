"""The flags `generate`, `serve`, `eval` and `build-data` share, defined once.

    g = add_model_args(parser)                        # --model --device --dtype --rope-scaling ...
    llm = LLM(args.model, **llm_kwargs(args, rope_for_args(args, args.model, max_path_tokens)))
    add_gating_args(group)                            # --stop-on-agreement --prune-confidence ...

`--rope-scaling` is resolved by `parathinker.config.resolve_rope_scaling` (one pure function);
`--layout` picks the native (SPEC §4, default) or the reference engine's layout (SPEC §6).
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from parathinker.config import SamplingParams, parse_rope_scaling, resolve_rope_scaling

LAYOUTS = ("native", "reference")  # as parathinker.engine.LAYOUTS, without importing torch here
LINEAR_BACKENDS = ("auto", "plain", "packed", "int8")  # as parathinker.model.fast_linear
ATTENTION_BACKENDS = ("runs", "flex", "gathered")  # parathinker.attention.paged.BACKENDS
PLAIN_ROPE = {"rope_type": "default"}  # an LLM(rope_scaling=...) override meaning "no scaling"

ROPE_HELP = (
    "auto: the checkpoint's own rope_scaling if it has one (a Llama's llama3 stays), else for a "
    "Qwen2 checkpoint running ParaThinker paths the reference's YaRN when paths exceed 8192 tokens "
    "(factor = max path tokens / 8192, original length 9280, beta 32/1; SPEC §5.6); none: add "
    "nothing (the checkpoint's own stays); reference: that YaRN for the path budget in place of "
    "the checkpoint's own, as the reference engine does; or a JSON object, e.g. "
    "'{\"rope_type\": \"yarn\", \"factor\": 4, \"original_max_position_embeddings\": 8192}'. "
    "Default: %(default)s")
LAYOUT_HELP = (
    "native: the train-consistent layout (SPEC §4: no pads, every path closed, summary at "
    "Lp + Lmax); reference: the released vLLM engine's layout (SPEC §6: prompt and finished paths "
    "padded with <vllm_pad> to multiples of 16, lock-step first-finish with unfinished paths "
    "truncated, summary at 2·Lp + L, template forced one token per step, summary capped at 128 "
    "tokens), to reproduce the model card")


class HelpFormatter(argparse.HelpFormatter):
    """Shows each flag's default (a list as a comma list) unless its help already states it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if "default" in text.lower() or not action.option_strings or d in (None, False, argparse.SUPPRESS):
            return text
        shown = ",".join(map(str, d)) if isinstance(d, (tuple, list)) else str(d)
        return f"{text} (default: {shown.replace('%', '%%')})"


def _rope(text: str) -> str | dict[str, Any]:
    try:
        return parse_rope_scaling(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _layout(text: str) -> str:
    if text not in LAYOUTS:
        raise argparse.ArgumentTypeError(f"--layout takes {' or '.join(LAYOUTS)}, got {text!r}")
    return text


def _layouts(text: str) -> tuple[str, ...]:
    values = tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    if not values:
        raise argparse.ArgumentTypeError("--layout needs at least one of native, reference")
    return tuple(_layout(v) for v in values)


def add_model_args(p: argparse.ArgumentParser, *, model_flag: str = "--model",
                   model_help: str = "checkpoint directory or Hugging Face hub id",
                   layout_list: bool = False) -> Any:
    """Add the shared model flags to `p` as one group and return the group. `model_flag` names the
    checkpoint flag (`--teacher` for build-data); `layout_list` lets --layout take a comma list
    (eval runs each layout in turn)."""
    g = p.add_argument_group("model")
    g.add_argument(model_flag, required=True, help=model_help)
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    g.add_argument("--dtype", default="auto",
                   help="float32, bfloat16, float16 or auto: the checkpoint's dtype on GPU, float32 "
                        "on CPU (default: %(default)s)")
    g.add_argument("--rope-scaling", type=_rope, default="auto",
                   metavar="{auto,none,reference,JSON}", help=ROPE_HELP)
    if layout_list:
        g.add_argument("--layout", type=_layouts, default=("native",), metavar="native,reference",
                       help=LAYOUT_HELP + ". A comma list runs each layout in turn into one report "
                                          "(default: native)")
    else:
        g.add_argument("--layout", type=_layout, default="native", metavar="{native,reference}",
                       help=LAYOUT_HELP + " (default: %(default)s)")
    g.add_argument("--linear", default="auto", choices=LINEAR_BACKENDS,
                   help="CPU linear layers: auto (packed for float32 on CPU), packed, int8 or plain "
                        "(default: %(default)s)")
    g.add_argument("--allow-pickle", action="store_true",
                   help="load a checkpoint that has only *.bin pickle weights (pickles can run "
                        "arbitrary code: only for checkpoints you trust; converting them once with "
                        "`python -m parathinker.model.to_safetensors DIR` is safer)")
    g.add_argument("--attention", default="auto", choices=("auto", *ATTENTION_BACKENDS),
                   help="attention over the paged KV cache: auto (runs on CPU, flex on CUDA), runs, "
                        "flex (FlexAttention) or gathered (the slow twin: each context gathered) "
                        "(default: %(default)s)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="decode steps through a torch.compile'd forward per batch bucket, replayed "
                        "as CUDA graphs on CUDA; prefill and odd shapes stay eager; the linear "
                        "layers are plain then (default: on for CUDA, off on CPU)")
    return g


def add_sampling_args(g: Any, *, temperature: float, top_p: float = 1.0, top_k: int | None = 0,
                      seed: int | None = None, seed_help: str = "random seed; same seed, same "
                      "output (default: %(default)s: fresh randomness)") -> None:
    """--temperature --top-p [--top-k] [--seed] with one help text each; defaults per command."""
    g.add_argument("--temperature", type=float, default=temperature,
                   help="sampling temperature; 0 is greedy (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=top_p,
                   help="nucleus sampling: keep the smallest set of tokens whose probability sums "
                        "to at least this; 1 keeps all (default: %(default)s)")
    if top_k is not None:
        g.add_argument("--top-k", type=int, default=top_k,
                       help="keep the k most likely tokens; 0 keeps all (default: %(default)s)")
    if seed is not None or seed_help:
        g.add_argument("--seed", type=int, default=seed, help=seed_help)


def add_path_budget_args(g: Any, *, max_path_tokens: int, min_path_tokens: int | None = 0,
                         max_summary_tokens: int = 1024, min_finished_paths: int = 1,
                         note: str = "") -> None:
    """The budgets of one ParaThinker request (SamplingParams' fields), one help text each."""
    g.add_argument("--max-path-tokens", type=int, default=max_path_tokens,
                   help="token budget of each path, its <think k> tags included; lowered to what "
                        f"the model's context leaves{note} (default: %(default)s)")
    if min_path_tokens is not None:
        g.add_argument("--min-path-tokens", type=int, default=min_path_tokens,
                       help="a path cannot end before this many tokens (its end tag is masked); "
                            "fixes path lengths for benchmarks (default: %(default)s)")
    g.add_argument("--max-summary-tokens", type=int, default=max_summary_tokens,
                   help="token budget of the summary, its template included (default: %(default)s)")
    g.add_argument("--min-finished-paths", type=int, default=min_finished_paths,
                   help="thinking stops once this many paths have finished; the rest are cut: 1 is "
                        "the paper's first-finish, P waits for every path; a value above the "
                        "number of paths means every path (default: %(default)s)")


def comma_ints(text: str) -> tuple[int, ...]:
    """A comma list of integers (eval's --paths, --stop-on-agreement ...)."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def comma_thresholds(text: str) -> tuple[float | None, ...]:
    """A comma list of finite numbers, `none` for off (eval's --prune-confidence)."""
    values: list[float | None] = []
    for v in (v.strip() for v in text.split(",") if v.strip()):
        try:
            values.append(None if v.lower() == "none" else float(v))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers or none, got {text!r}") from None
        if values[-1] is not None and not math.isfinite(values[-1]):  # type: ignore[arg-type]
            raise argparse.ArgumentTypeError(f"expected finite numbers, got {v!r}")
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number or none")
    return tuple(values)


GATING_FIELDS = ("confidence_window", "confidence_top_k", "prune_confidence", "stop_on_agreement")


def add_gating_args(g: Any, *, agreement_note: str, lists: bool = False) -> None:
    """Gated thinking's flags (issue 23): SamplingParams' fields of the same names, its defaults
    (off), the rules in engine/confidence.py. `agreement_note` says what a --stop-on-agreement
    above a request's paths does for this command; `lists` (eval): --stop-on-agreement and
    --prune-confidence take comma lists, each value a configuration run in turn."""
    d = SamplingParams()
    each = "; a comma list: each value a configuration" if lists else ""
    g.add_argument("--stop-on-agreement", type=comma_ints if lists else int,
                   default=(d.stop_on_agreement,) if lists else d.stop_on_agreement,
                   metavar="N[,N...]" if lists else "N",
                   help="cut the open paths and start the summary once N finished paths give the "
                        "same answer (their last \\boxed{}); whichever of it and "
                        f"--min-finished-paths fires first; {agreement_note}; 0: off{each} "
                        f"(default: {d.stop_on_agreement})")
    g.add_argument("--prune-confidence", type=comma_thresholds if lists else float,
                   default=(d.prune_confidence,) if lists else d.prune_confidence,
                   metavar="C[,C...]" if lists else "C",
                   help="close a path whose group confidence falls below C (finish reason pruned; "
                        "never the last open path); needs --confidence-window"
                        + ("; none: off" if lists else "") + f"{each} (default: off)")
    g.add_argument("--confidence-window", type=int, default=d.confidence_window,
                   help="each path's confidence (DeepConf's lowest group confidence) over windows "
                        "of this many tokens, reported with each path (eval: also the "
                        "confidence-weighted vote over paths); 0: off (default: %(default)s)")
    g.add_argument("--confidence-top-k", type=int, default=d.confidence_top_k,
                   help="log-probabilities a token's confidence averages (default: %(default)s)")


def add_failover_args(g: Any, who: str = "server") -> None:
    """--server-retries --request-timeout of the commands that spread work over endpoints."""
    g.add_argument("--server-retries", type=int, default=5,
                   help=f"endpoint: a {who} that failed this many times in a row (refused, timed out, "
                        f"5xx; retried after 1, 2, 4, ... s) is dropped for the run; the run fails "
                        f"only when every {who} is dropped (default: %(default)s)")
    g.add_argument("--request-timeout", type=float, default=3600.0,
                   help="endpoint: seconds one HTTP request may take (default: %(default)s)")


def checkpoint_config(model: str) -> dict[str, Any]:
    """config.json of a checkpoint directory or hub id ({} when it has none)."""
    from parathinker.model.checkpoint import resolve_model_dir

    f = resolve_model_dir(model) / "config.json"
    return json.loads(f.read_text()) if f.exists() else {}


def rope_for_args(args: argparse.Namespace, model: str, max_path_tokens: int,
                  parallel: bool = True) -> dict[str, Any] | None:
    """The resolved rope scaling (None: plain RoPE) of `model` for this path budget."""
    return resolve_rope_scaling(args.rope_scaling, checkpoint_config(model), max_path_tokens, parallel)


def llm_kwargs(args: argparse.Namespace, rope_scaling: dict[str, Any] | None,
               layout: str | None = None) -> dict[str, Any]:
    """`LLM(model, **llm_kwargs(...))` from the shared flags and a resolved rope scaling."""
    return {"device": args.device, "dtype": args.dtype, "linear": args.linear,
            "allow_pickle": getattr(args, "allow_pickle", False),
            "attention": args.attention, "layout": layout or args.layout, "compile": args.compile,
            "rope_scaling": PLAIN_ROPE if rope_scaling is None else rope_scaling}
