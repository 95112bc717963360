"""Kernel launches per decode step: the ops one engine step runs, at 2 and at 10 layers.

A deep-narrow random model (hidden 128, so the count is not hidden by time) runs one request of
8 paths through the engine until every path decodes; then one whole `Engine.step` (the runner's
inputs and metadata, the forward, the logits, the masks, the sampler, the requests' `take`) is
profiled with torch.profiler. Counted: leaf ops (no child op) named `aten::` or `mkldnn::` that
are not views, allocations or no-ops (`VIEWS`: no kernel runs for them on a GPU), and F.rms_norm
as one (`ONE_KERNEL`: one CUDA kernel, several ops on CPU). With n2 and n10 the
counts at 2 and 10 layers: per layer = (n10 - n2) / 8, fixed = n2 - 2 * per layer.

    python bench/launches.py
    python bench/launches.py --attention gathered --temperature 1
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from common import DTYPES, machine, prompt_ids, random_model, report, synthetic_ctrl
from parathinker.config import SamplingParams
from parathinker.engine import Engine
from parathinker.model.fast_linear import apply_linear_backend

DEEP_NARROW = dict(model_type="qwen2", vocab_size=2048, hidden_size=128, intermediate_size=256,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096,
                   tie_word_embeddings=False, max_segments=32)
VIEWS = frozenset(f"aten::{n}" for n in (
    "view", "reshape", "_reshape_alias", "_unsafe_view", "as_strided", "expand", "expand_as",
    "transpose", "t", "permute", "unsqueeze", "squeeze", "select", "slice", "narrow", "alias",
    "detach", "lift_fresh", "unflatten", "flatten", "split", "split_with_sizes", "chunk",
    "unbind", "view_as_real", "view_as_complex", "_unsafe_split", "resolve_conj", "resolve_neg",
    "detach_", "empty", "empty_like", "empty_strided", "resize_", "set_", "to", "contiguous",
    "result_type", "type_as", "is_nonzero", "_has_compatible_shallow_copy_type"))
# One kernel on CUDA, decomposed into ~8 ops by torch on CPU: counted once, as on the GPU.
ONE_KERNEL = frozenset({"aten::_fused_rms_norm"})


def kernels(prof: profile) -> Counter[str]:
    """The kernel ops of a profile, by name: aten/mkldnn ops, not in VIEWS, none of whose
    descendants is one (e.g. `aten::linear` -> `aten::addmm` counts once, as addmm; an op whose
    only children are views or allocations counts itself)."""
    counts: Counter[str] = Counter()

    def visit(e) -> bool:  # -> whether e's subtree holds a counted op
        if e.name in ONE_KERNEL:
            counts[e.name] += 1
            return True
        below = [visit(c) for c in e.cpu_children]  # every child visited
        if any(below):
            return True
        if e.name.startswith(("aten::", "mkldnn::")) and e.name not in VIEWS:
            counts[e.name] += 1
            return True
        return False

    for e in prof.events():
        if e.cpu_parent is None:
            visit(e)
    return counts


def count_step(layers: int, args: argparse.Namespace) -> Counter[str]:
    shape = dict(DEEP_NARROW, num_hidden_layers=layers)
    model = random_model(shape, args.device, DTYPES[args.dtype])
    apply_linear_backend(model, args.linear)
    ctrl, template = synthetic_ctrl(shape["vocab_size"])
    engine = Engine(model, ctrl, template, num_kv_blocks=256, attention=args.attention)
    params = SamplingParams(num_paths=args.paths, max_path_tokens=64, min_path_tokens=64,
                            min_finished_paths=args.paths, max_summary_tokens=len(template) + 1,
                            temperature=args.temperature, seed=0)
    engine.add_request("r", [t % 1000 for t in prompt_ids(args.prompt)], params)
    for _ in range(4):  # prefill, the paths' first tokens, then plain decode steps (warm-up)
        engine.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.step()
    return kernels(prof)


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--paths", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--linear", default="auto")
    ap.add_argument("--top", type=int, default=25, help="op names to print per layer and fixed")
    args = ap.parse_args()
    torch.manual_seed(0)
    config = vars(args) | {"model_shape": DEEP_NARROW}
    print("machine:", machine())
    print("config:", config)
    c2, c10 = count_step(2, args), count_step(10, args)
    n2, n10 = sum(c2.values()), sum(c10.values())
    per_layer = (n10 - n2) / 8
    fixed = n2 - 2 * per_layer
    layer_ops = {k: (c10[k] - c2[k]) / 8 for k in c10 if c10[k] != c2[k]}
    fixed_ops = {k: c2[k] - 2 * layer_ops.get(k, 0) for k in c2}
    for title, ops in (("per layer", layer_ops), ("fixed", fixed_ops)):
        print(f"{title}:")
        for name, n in sorted(ops.items(), key=lambda kv: -kv[1])[:args.top]:
            if n:
                print(f"  {n:6.2f}  {name}")
    print(f"2 layers: {n2}, 10 layers: {n10}; per layer {per_layer:.2f}, fixed {fixed:.2f}")
    report("launches", config, {"n2": n2, "n10": n10, "per_layer": per_layer, "fixed": fixed,
                                "per_layer_ops": layer_ops,
                                "fixed_ops": {k: v for k, v in fixed_ops.items() if v}})


if __name__ == "__main__":
    main()
