"""The Llama family's elementwise pieces: RMSNorm and the SwiGLU gate. Plain PyTorch for now (exactly
reference.rms_norm / reference.swiglu); fused CPU/CUDA kernels with the same contract replace the bodies
without changing a caller."""

from __future__ import annotations

from torch import Tensor

from fastrlhf.ops import reference


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim of x (..., C); weight (C,). fp32 accumulation
    for fp32/bf16/fp16 x; differentiable in x and weight."""
    if x.dim() < 1 or weight.shape != x.shape[-1:]:
        raise ValueError(
            f"weight must be (C,) = ({x.shape[-1] if x.dim() else '?'},); got {tuple(weight.shape)}"
        )
    if not eps >= 0.0:
        raise ValueError(f"eps must be a finite number >= 0; got {eps}")
    return reference.rms_norm(x, weight, eps)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up elementwise (gate and up of one shape); differentiable in both."""
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have one shape; got {tuple(gate.shape)} and {tuple(up.shape)}")
    return reference.swiglu(gate, up)
