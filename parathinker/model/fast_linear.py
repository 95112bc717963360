"""Faster linear layers for CPU decoding, swapped into a loaded model for inference only.

Decode is memory-bound: every step streams all weights once, whatever the number of rows. With
plain `F.linear`, 8 rows cost far more than 1 on CPU; weights reordered once into oneDNN's blocked
layout (`torch.ops.mkldnn._reorder_linear_weight` / `_linear_pointwise`) bring extra rows close to
free. int8 dynamic quantization (`torch.ao.quantization.quantize_dynamic`) quarters the bytes
streamed, at some accuracy cost. `LLM(..., linear="auto")` picks "packed" for float32 on CPU.

oneDNN builds (JIT-compiles) and caches one primitive per input shape, in two caches of 1,024
entries each (oneDNN's own and ideep's), about 0.6 MB apiece whatever the row count (measured
for 300 to 9,000 rows, glibc's mmap threshold fixed). The engine's row count changes every step
(1 to `max_num_batched_tokens`), so a server's memory grew by hundreds of MB, round after round,
as new counts kept coming (issue 22). `PackedLinear` therefore pads rows up to one of a few
sizes (`padded_rows`: exact up to 16, then 8 sizes per power of two, at most 1/8 extra rows) and
computes at most CHUNK_ROWS rows per call: 88 shapes per layer shape and op (40 of them over 256
rows, which only long steps reach), each built once and kept: memory bounded by the sizes, not
growing with the counts seen.

CHUNK_ROWS is the engine's default step budget (8,192 tokens), so an engine step's linear is one
oneDNN call, as fast as MKL's `F.linear` on many rows. Many small calls are not: chunks of 256
rows and the `cat` of their outputs made a 4K prefill about 2x transformers' on a loaded 2-core
machine (a parallel region per call, and a copy of every output), where one call is not slower
than transformers' (BENCHMARKS.md, "Prefill with packed linears (issue 25)").
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from parathinker.model.fused import fuse_for_inference

LINEAR_BACKENDS = ("auto", "plain", "packed", "int8")


EXACT_ROWS = 16  # row counts up to this are used as they are (decode of a few sequences)
CHUNK_ROWS = 8192  # larger row counts are computed in chunks of this many rows


def padded_rows(rows: int) -> int:
    """The row count a PackedLinear computes for `rows` input rows: `rows` itself up to
    EXACT_ROWS, else `rows` rounded up to a multiple of 1/8 of the power of two below it."""
    if rows <= EXACT_ROWS:
        return rows
    step = 1 << (rows.bit_length() - 4)
    return -(-rows // step) * step


class PackedLinear(nn.Module):
    """An `nn.Linear` whose float32 weight is prepacked for oneDNN (inference only); rows go in
    chunks of at most CHUNK_ROWS, padded with zeros to `padded_rows`, so oneDNN sees few shapes
    (see the module docstring)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(w))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._chunked(x.reshape(-1, self.in_features), None)
        return y.reshape(*x.shape[:-1], self.out_features)

    def forward_add(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """self(x) + other in one oneDNN call per chunk (its binary "add" post-op); other: the
        output's shape. Chunked and padded as forward is (the same few shapes)."""
        y = self._chunked(x.reshape(-1, self.in_features), other.reshape(-1, self.out_features))
        return y.view(other.shape)

    def _chunked(self, rows: torch.Tensor, add: torch.Tensor | None) -> torch.Tensor:
        if rows.shape[0] <= CHUNK_ROWS:
            return self._padded(rows, add)
        adds = [None] * -(-rows.shape[0] // CHUNK_ROWS) if add is None else add.split(CHUNK_ROWS)
        return torch.cat([self._padded(c, a) for c, a in zip(rows.split(CHUNK_ROWS), adds)])

    def _padded(self, rows: torch.Tensor, add: torch.Tensor | None) -> torch.Tensor:
        m = rows.shape[0]
        if padded_rows(m) != m:
            pad = padded_rows(m) - m
            rows = torch.cat([rows, rows.new_zeros(pad, self.in_features)])
            if add is not None:
                add = torch.cat([add, add.new_zeros(pad, self.out_features)])
        if add is None:
            y = torch.ops.mkldnn._linear_pointwise(rows, self.packed_weight, self.bias, "none", [], "")
        else:
            y = torch.ops.mkldnn._linear_pointwise.binary(rows, add, self.packed_weight, self.bias,
                                                          "add")
        return y[:m]


def can_prepack(model: nn.Module) -> bool:
    p = next(model.parameters())
    return (p.device.type == "cpu" and p.dtype == torch.float32
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def _swap_linears(model: nn.Module, make) -> int:
    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, child_name, make(child))
                count += 1
    return count


def prepack_linears(model: nn.Module) -> int:
    """Replace every nn.Linear with a PackedLinear; returns how many were replaced."""
    if not can_prepack(model):
        raise ValueError("prepacked linears need a float32 model on a CPU with oneDNN (mkldnn)")
    return _swap_linears(model, PackedLinear)


def quantize_int8(model: nn.Module) -> int:
    """int8 dynamic quantization of every nn.Linear (CPU); returns how many were replaced."""
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32:
        raise ValueError("int8 dynamic quantization needs a float32 model on CPU")
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError as e:  # removed in some future torch release
        raise ValueError("this torch build has no torch.ao.quantization.quantize_dynamic") from e
    count = sum(type(m) is nn.Linear for m in model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated upstream in favour of torchao
        quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return count


def apply_linear_backend(model: nn.Module, backend: str) -> str:
    """Prepare a loaded model for inference: fuse its layers (model.fused.fuse_for_inference),
    then swap in the requested linear implementation; returns the one in effect."""
    if backend not in LINEAR_BACKENDS:
        raise ValueError(f"unknown linear backend {backend!r}; use one of {LINEAR_BACKENDS}")
    fuse_for_inference(model)
    if backend == "auto":
        backend = "packed" if can_prepack(model) else "plain"
    if backend == "packed":
        prepack_linears(model)
    elif backend == "int8":
        quantize_int8(model)
    return backend
