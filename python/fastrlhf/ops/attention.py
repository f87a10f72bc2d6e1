"""Causal grouped-query attention with segment masking: a flash-attention style C++ kernel on the CPU
(tiles of queries x keys, online softmax, memory linear in T), differentiable in q, k and v."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fastrlhf._ext import HAS_EXT
from fastrlhf.ops import reference
from fastrlhf.ops._checks import same_device

if HAS_EXT:

    @torch.library.register_fake("fastrlhf::causal_attention_fwd")
    def _fwd_fake(
        q: Tensor, k: Tensor, v: Tensor, scale: float, segment_ids: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        B, H, Tq, _ = q.shape
        return torch.empty_like(q), q.new_empty((B, H, Tq), dtype=torch.float64)  # out, lse (B, H, Tq)

    @torch.library.register_fake("fastrlhf::causal_attention_bwd")
    def _bwd_fake(
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        scale: float,
        segment_ids: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        q, k, v, scale, segment_ids = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, segment_ids)
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)  # saved for the backward only

    def _backward(ctx: Any, dout: Tensor, _dlse: Tensor | None) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse, segment_ids = ctx.saved_tensors
        dq, dk, dv = torch.ops.fastrlhf.causal_attention_bwd(dout, q, k, v, out, lse, ctx.scale, segment_ids)
        return dq, dk, dv, None, None

    torch.library.register_autograd("fastrlhf::causal_attention_fwd", _backward, setup_context=_setup_context)


def causal_attention(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, segment_ids: Tensor | None = None
) -> Tensor:
    """softmax(q k^T * scale + mask) v with grouped-query heads; returns (B, H, Tq, D) in q's dtype.

    q (B, H, Tq, D); k, v (B, Hkv, Tk, D) with Tq <= Tk, H % Hkv == 0 and D <= 256. Query i sits at
    position p = i + Tk - Tq and sees key j iff j <= p and, when segment_ids (B, Tk) (any integer dtype)
    is given, segment_ids[b, j] == segment_ids[b, p]: training (Tq == Tk), KV-cache decoding (Tq < Tk),
    left padding (pads in their own segment) and packed documents. scale defaults to D**-0.5.
    fp32/fp64/bf16/fp16; math in fp32 (fp64 for float64). Differentiable in q, k, v.
    """
    same_device(q=q, k=k, v=v, segment_ids=segment_ids)
    if scale is None:
        # a malformed q is refused by the kernel's checks; any scale will do until then
        scale = q.shape[-1] ** -0.5 if q.dim() == 4 and q.shape[-1] > 0 else 1.0
    if not HAS_EXT:
        return reference.causal_attention(q, k, v, scale=scale, segment_ids=segment_ids)
    out, _ = torch.ops.fastrlhf.causal_attention_fwd(q, k, v, float(scale), segment_ids)
    return out
