"""Faster linear layers for CPU decoding, swapped into a loaded model for inference only.

Decode is memory-bound: every step streams all weights once, whatever the number of rows. With
plain `F.linear`, 8 rows cost far more than 1 on CPU; weights reordered once into oneDNN's blocked
layout (`torch.ops.mkldnn._reorder_linear_weight` / `_linear_pointwise`) bring extra rows close to
free. int8 dynamic quantization (`torch.ao.quantization.quantize_dynamic`) quarters the bytes
streamed, at some accuracy cost. `LLM(..., linear="auto")` picks "packed" for float32 on CPU.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from parathinker.model.fused import fuse_for_inference

LINEAR_BACKENDS = ("auto", "plain", "packed", "int8")


class PackedLinear(nn.Module):
    """An `nn.Linear` whose float32 weight is prepacked for oneDNN (inference only)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(w))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.packed_weight,
                                                self.bias, "none", [], "")
        return y.reshape(*x.shape[:-1], self.out_features)

    def forward_add(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """self(x) + other in one oneDNN call (its binary "add" post-op); other: the output's shape."""
        y = torch.ops.mkldnn._linear_pointwise.binary(
            x.reshape(-1, self.in_features), other.reshape(-1, self.out_features),
            self.packed_weight, self.bias, "add")
        return y.view(other.shape)


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
