"""Rotary position embeddings on q and k in one pass, which also moves the heads to attention's layout."""

from __future__ import annotations

import torch
from torch import Tensor

from fastrlhf._ext import HAS_EXT
from fastrlhf.ops import reference
from fastrlhf.ops._checks import same_device

if HAS_EXT:

    def _heads_first(x: Tensor) -> Tensor:  # (B, T, H, D) -> an empty (B, H, T, D), and back
        B, T, H, D = x.shape
        return x.new_empty((B, H, T, D))

    @torch.library.register_fake("fastrlhf::rope_fwd")
    def _fwd_fake(q: Tensor, k: Tensor, positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
        return _heads_first(q), _heads_first(k)

    @torch.library.register_fake("fastrlhf::rope_bwd")
    def _bwd_fake(dq: Tensor, dk: Tensor, positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
        return _heads_first(dq), _heads_first(dk)  # the same swap of dims 1 and 2

    def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        _, _, positions, inv_freq = inputs
        ctx.save_for_backward(positions, inv_freq)  # the rotation is recomputed: nothing of q or k is kept

    def _backward(ctx, dq, dk):  # type: ignore[no-untyped-def]
        positions, inv_freq = ctx.saved_tensors
        dq_in, dk_in = torch.ops.fastrlhf.rope_bwd(dq, dk, positions, inv_freq)
        return dq_in, dk_in, None, None

    torch.library.register_autograd("fastrlhf::rope_fwd", _backward, setup_context=_setup_context)


def rope(q: Tensor, k: Tensor | None, positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor | None]:
    """Rotary embeddings (RoFormer, arXiv 2104.09864) on q and k in HF's half-split layout, returned in
    attention's layout: q (B, T, H, D) -> (B, H, T, D), k (B, T, Hkv, D) -> (B, Hkv, T, D) (k may be None).

    Each head's pairs (x[i], x[i + D/2]) rotate by a_i = float(positions[b, t]) * inv_freq[i], an fp32
    product as HF computes it, with cos a_i and sin a_i the fp32 roundings of the exact values (HF's
    torch.cos/sin in fp32 are within 1 ulp of them). positions (B, T) or (T,) int64; inv_freq (D/2,)
    (used in fp32); D even, <= 512. q, k float32/float64/bfloat16/float16, math in fp32 (fp64 for
    float64), one rounding per output. Reads the inputs at their strides (e.g. a view of a projection);
    differentiable in q and k.
    """
    same_device(q=q, k=k, positions=positions, inv_freq=inv_freq)
    inv_freq = inv_freq.float()
    if not HAS_EXT:
        return reference.rope(q, positions, inv_freq), None if k is None else reference.rope(
            k, positions, inv_freq
        )
    if k is None:
        B, T, _, D = q.shape if q.dim() == 4 else (0, 0, 0, 0)  # a malformed q is refused by the kernel
        q_out, _ = torch.ops.fastrlhf.rope_fwd(q, q.new_empty((B, T, 0, D)), positions, inv_freq)
        return q_out, None
    return torch.ops.fastrlhf.rope_fwd(q, k, positions, inv_freq)
