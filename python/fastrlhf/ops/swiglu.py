"""SwiGLU's gate, silu(gate) * up, as one pass forward and one backward."""

from __future__ import annotations

import torch
from torch import Tensor

from fastrlhf._ext import HAS_EXT
from fastrlhf.ops import reference
from fastrlhf.ops._checks import same_device

if HAS_EXT:

    @torch.library.register_fake("fastrlhf::swiglu_fwd")
    def _fwd_fake(gate: Tensor, up: Tensor) -> Tensor:
        return gate.new_empty(gate.shape)  # contiguous, like the kernel's

    @torch.library.register_fake("fastrlhf::swiglu_bwd")
    def _bwd_fake(gate: Tensor, up: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
        return gate.new_empty(gate.shape), gate.new_empty(gate.shape)

    def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        ctx.save_for_backward(*inputs)  # silu(gate) is recomputed: two saved tensors, not torch's three

    def _backward(ctx, dy):  # type: ignore[no-untyped-def]
        gate, up = ctx.saved_tensors
        return torch.ops.fastrlhf.swiglu_bwd(gate, up, dy)

    torch.library.register_autograd("fastrlhf::swiglu_fwd", _backward, setup_context=_setup_context)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up elementwise (Shazeer 2020, arXiv 2002.05202): the gate of the Llama family's MLP.

    gate and up of one shape and dtype (float32/float64/bfloat16/float16); math in fp32 (fp64 for
    float64), one rounding to the dtype per output. Differentiable in both. Within fp32 rounding of
    F.silu(gate) * up for finite gate; at gate = -inf it gives the limit 0 where F.silu gives NaN.
    """
    same_device(gate=gate, up=up)
    if not HAS_EXT:
        return reference.swiglu(gate, up)
    return torch.ops.fastrlhf.swiglu_fwd(gate, up)
