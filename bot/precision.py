"""Inference precision of the encoder: fp32 as trained, or int8 linear layers for faster CPU serving.

One short text through MiniLM on a CPU is bound by reading the weights (about 40 MB of fp32 linear
layers per pass), not by arithmetic; int8 weights are a quarter of that. The activations are
quantised per token (one scale per row), not per tensor as torch's dynamic quantisation does: a
per-tensor scale depends on every text in the batch, so a customer's answer would change with who
else was batched alongside them. Per token, a text gets the same vector alone or in any batch.

The conversion is a pure function of the fp32 weights, so a bundle stores fp32 weights plus the
precision, and its calibration is fitted on the converted model (finetune/train.py).
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn

Precision = Literal["fp32", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "int8")
# Revision of each precision's arithmetic, for caches of its outputs (finetune/cache.py): bump it when
# the numbers Int8Linear gives change, so embeddings cached by older code are not mixed with new ones.
REVISIONS = {"fp32": "fp32", "int8": "int8.2"}


class _LastInput:
    """The last input a model's int8 layers quantised, so layers reading the same tensor (a
    transformer's query, key and value projections) quantise it once. Holding the tensor keeps
    its identity from being reused; its version counter catches an in-place change (inference-mode
    tensors have none: a BERT layer does not change its input in place between the three)."""

    def __init__(self) -> None:
        self.source: torch.Tensor | None = None
        self.version = -1
        self.quantised: torch.Tensor | None = None
        self.row_max: torch.Tensor | None = None

    def get(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if x is self.source and _version(x) == self.version and self.quantised is not None and self.row_max is not None:
            return self.quantised, self.row_max
        return None

    def put(self, x: torch.Tensor, quantised: torch.Tensor, row_max: torch.Tensor) -> None:
        self.source, self.version, self.quantised, self.row_max = x, _version(x), quantised, row_max


def _version(x: torch.Tensor) -> int:
    return -2 if x.is_inference() else x._version


class Int8Linear(nn.Module):
    """y = x W^T + b with W in int8 (one scale per output channel) and x in int8 (one scale per row).

    The product accumulates in int32 (`torch._int_mm`), so the only error is the rounding of W and x.
    """

    weight_t: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor

    def __init__(self, linear: nn.Linear, last_input: _LastInput | None = None):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_t", torch.round(weight / scale[:, None]).to(torch.int8).t().contiguous())
        self.register_buffer("weight_scale", scale / 127.0)  # folds in the activations' 1/127
        bias = linear.bias.detach().float().clone() if linear.bias is not None else torch.zeros(self.out_features)
        self.register_buffer("bias", bias)
        self._last_input = last_input or _LastInput()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        if rows.shape[0] == 0:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        cached = self._last_input.get(x)
        if cached is None:
            row_max = rows.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12)
            quantised = (rows * (127.0 / row_max)).round_().to(torch.int8)
            self._last_input.put(x, quantised, row_max)
        else:
            quantised, row_max = cached
        out = torch.addcmul(self.bias, torch._int_mm(quantised, self.weight_t), row_max * self.weight_scale)
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def apply_precision(model: nn.Module, precision: str) -> nn.Module:
    """`model` itself for fp32; for int8 a copy whose `nn.Linear` layers are `Int8Linear` (eval only)."""
    if precision == "fp32":
        return model
    if precision != "int8":
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    converted = copy.deepcopy(model).eval()
    last_input = _LastInput()  # one per model: its layers run one after another
    for parent in list(converted.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child, last_input))
    return converted.requires_grad_(False)
