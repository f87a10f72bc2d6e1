"""GELU with GPT-2's tanh approximation as one vectorised pass forward and one backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastrlhf._ext import HAS_EXT
from fastrlhf.ops import reference

if HAS_EXT:

    @torch.library.register_fake("fastrlhf::gelu_fwd")
    def _fwd_fake(x: Tensor) -> Tensor:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous, like the kernel's

    @torch.library.register_fake("fastrlhf::gelu_bwd")
    def _bwd_fake(x: Tensor, dy: Tensor) -> Tensor:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)

    def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        (x,) = inputs
        ctx.save_for_backward(x)  # y is not needed: the derivative is recomputed from x

    def _backward(ctx, dy):  # type: ignore[no-untyped-def]
        (x,) = ctx.saved_tensors
        return torch.ops.fastrlhf.gelu_bwd(x, dy)

    torch.library.register_autograd("fastrlhf::gelu_fwd", _backward, setup_context=_setup_context)


def gelu(x: Tensor) -> Tensor:
    """GPT-2's "gelu_new": 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), i.e.
    ``F.gelu(x, approximate="tanh")``, elementwise over any shape; differentiable.

    x float32/bfloat16/float16 is computed in fp32 (one rounding to x's dtype), float64 in fp64. Within
    fp32 rounding of F.gelu for finite x, and more accurate below x ~ -5, where F.gelu rounds to 0.
    At the infinities it gives the limits (gelu(-inf) = -0, derivatives 1 at +inf and 0 at -inf) where
    F.gelu gives NaN. CPU kernel only: CUDA (and other non-CPU) tensors run ``F.gelu(x, approximate="tanh")``.
    """
    if not HAS_EXT:
        return reference.gelu(x)
    if x.device.type != "cpu":
        return F.gelu(x, approximate="tanh")
    return torch.ops.fastrlhf.gelu_fwd(x)
