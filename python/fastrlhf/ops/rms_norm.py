"""RMSNorm over the last dim (the Llama family's norm) as one pass forward and one backward."""

from __future__ import annotations

import torch
from torch import Tensor

from fastrlhf._ext import HAS_EXT
from fastrlhf.ops import reference
from fastrlhf.ops._checks import same_device

if HAS_EXT:

    @torch.library.register_fake("fastrlhf::rms_norm_fwd")
    def _fwd_fake(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=acc)  # y, rstd (...,)

    @torch.library.register_fake("fastrlhf::rms_norm_bwd")
    def _bwd_fake(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
        return x.new_empty(x.shape), weight.new_empty(weight.shape)

    def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        x, weight, _eps = inputs
        _, rstd = output
        ctx.save_for_backward(x, weight, rstd)
        ctx.mark_non_differentiable(rstd)  # saved for the backward only

    def _backward(ctx, dy, _drstd):  # type: ignore[no-untyped-def]
        x, weight, rstd = ctx.saved_tensors
        dx, dw = torch.ops.fastrlhf.rms_norm_bwd(dy, x, weight, rstd)
        return dx, dw, None

    torch.library.register_autograd("fastrlhf::rms_norm_fwd", _backward, setup_context=_setup_context)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim (Zhang & Sennrich 2019, arXiv 1910.07467).

    x (..., C) float32/float64/bfloat16/float16; weight (C,) of x's dtype or float32 (a weight kept in
    fp32 under autocast). Math in fp32 (fp64 for float64), the result rounded once to x's dtype; in fp32
    the same two roundings as HF's LlamaRMSNorm, (x r) w. Differentiable in x and weight.
    """
    same_device(x=x, weight=weight)
    if not HAS_EXT:
        return reference.rms_norm(x, weight, eps)
    return torch.ops.fastrlhf.rms_norm_fwd(x, weight, float(eps))[0]
