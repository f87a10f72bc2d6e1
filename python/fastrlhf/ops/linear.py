"""y = x @ weight.T + bias with a kernel for a few rows: the KV-cache decode step's linears and LM head.

GEMM libraries are tuned for many rows; at 1-128 rows (one token per sequence) the cost is reading the
weight once, which `rows_linear` does at close to memory speed. `linear` is F.linear everywhere else."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastrlhf._ext import HAS_EXT
from fastrlhf.ops._checks import same_device

MAX_ROWS = 128  # above this a blocked GEMM (torch's) reuses each weight tile enough to be faster

if HAS_EXT:

    @torch.library.register_fake("fastrlhf::rows_linear")
    def _rows_linear_fake(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return x.new_empty((x.shape[0], weight.shape[0]))


def rows_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (N, K) @ weight (M, K).T + bias (M,) -> (N, M), fp32 CPU tensors. Not differentiable (inference)."""
    same_device(x=x, weight=weight, bias=bias)
    return torch.ops.fastrlhf.rows_linear(x, weight, bias)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias) for x (..., K); takes `rows_linear` when no gradient is needed and x has
    at most MAX_ROWS rows of fp32 on the CPU (the result differs from F.linear by fp32 rounding only)."""
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    if (
        not HAS_EXT
        or needs_grad
        or not 0 < rows <= MAX_ROWS
        or x.device.type != "cpu"
        or x.dtype != torch.float32
        or weight.dtype != torch.float32
        or (bias is not None and bias.dtype != torch.float32)
    ):
        return F.linear(x, weight, bias)
    y = torch.ops.fastrlhf.rows_linear(x.reshape(rows, x.shape[-1]), weight, bias)  # (rows, M)
    return y.view(*x.shape[:-1], weight.shape[0])  # (..., M)
