"""PPO's clipped surrogate + clipped value loss and its statistics as one fused pass each way."""

from __future__ import annotations

import torch
from torch import Tensor

from fastrlhf._ext import HAS_EXT
from fastrlhf.ops import reference
from fastrlhf.ops._checks import same_device
from fastrlhf.ops.reference import PPO_STATS

if HAS_EXT:

    @torch.library.register_fake("fastrlhf::ppo_loss_fwd")
    def _fwd_fake(
        logprobs: Tensor,
        old_logprobs: Tensor,
        advantages: Tensor,
        values: Tensor,
        old_values: Tensor,
        returns: Tensor,
        mask: Tensor,
        entropy: Tensor | None,
        clip_range: float,
        clip_range_value: float,
        vf_coef: float,
        ent_coef: float,
    ) -> tuple[Tensor, Tensor]:
        acc = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
        return logprobs.new_empty(()), logprobs.new_empty((len(PPO_STATS),), dtype=acc)  # loss (), stats (8,)

    @torch.library.register_fake("fastrlhf::ppo_loss_bwd")
    def _bwd_fake(
        grad_loss: Tensor,
        logprobs: Tensor,
        old_logprobs: Tensor,
        advantages: Tensor,
        values: Tensor,
        old_values: Tensor,
        returns: Tensor,
        mask: Tensor,
        entropy: Tensor | None,
        clip_range: float,
        clip_range_value: float,
        vf_coef: float,
        ent_coef: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        d_entropy = torch.empty_like(logprobs) if entropy is not None else logprobs.new_empty((0,))
        return torch.empty_like(logprobs), torch.empty_like(logprobs), d_entropy  # (B, T) each

    def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        *tensors, entropy, clip_range, clip_range_value, vf_coef, ent_coef = inputs
        ctx.save_for_backward(*tensors, entropy)
        ctx.coefs = (clip_range, clip_range_value, vf_coef, ent_coef)
        ctx.mark_non_differentiable(output[1])  # stats

    def _backward(ctx, grad_loss, _grad_stats):  # type: ignore[no-untyped-def]
        *tensors, entropy = ctx.saved_tensors
        d_logprobs, d_values, d_entropy = torch.ops.fastrlhf.ppo_loss_bwd(
            grad_loss, *tensors, entropy, *ctx.coefs
        )
        return (
            d_logprobs, None, None, d_values, None, None, None,
            d_entropy if entropy is not None else None, None, None, None, None,
        )  # fmt: skip

    torch.library.register_autograd("fastrlhf::ppo_loss_fwd", _backward, setup_context=_setup_context)


def _common_dtype(logprobs: Tensor, others: tuple[Tensor | None, ...], mask: Tensor) -> torch.dtype | None:
    """None when every float input already has logprobs' dtype; else the dtype to compute in
    (the reference's: float64 for float64 logprobs, otherwise float32)."""
    dt = logprobs.dtype
    if all(t is None or not t.is_floating_point() or t.dtype == dt for t in (*others, mask)):
        return None
    return torch.float64 if dt == torch.float64 else torch.float32


def ppo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip_range: float = 0.2,
    clip_range_value: float = 0.2,
    vf_coef: float = 0.1,
    entropy: Tensor | None = None,
    ent_coef: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate + clipped value loss (arXiv 1707.06347), masked token means over (B, T).

    loss = pg_loss + vf_coef * v_loss - ent_coef * mean(entropy), in logprobs' dtype; stats maps
    reference.PPO_STATS to 0-dim tensors (float32, or float64 for float64 logprobs). mask is bool or
    float weights. Differentiable in logprobs, values and entropy. Float inputs of mixed dtypes are
    computed in float32 (float64 if logprobs is float64), as the reference does.
    """
    same_device(
        logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, values=values,
        old_values=old_values, returns=returns, mask=mask, entropy=entropy,
    )  # fmt: skip
    if not HAS_EXT:
        return reference.ppo_loss(
            logprobs, old_logprobs, advantages, values, old_values, returns, mask, clip_range=clip_range,
            clip_range_value=clip_range_value, vf_coef=vf_coef, entropy=entropy, ent_coef=ent_coef,
        )  # fmt: skip
    out_dtype = logprobs.dtype
    others = (old_logprobs, advantages, values, old_values, returns, entropy)
    dt = _common_dtype(logprobs, others, mask)
    if dt is not None:  # autograd casts the gradients back to each input's dtype
        cast = [t.to(dt) if t is not None and t.is_floating_point() else t for t in (logprobs, *others, mask)]
        logprobs, old_logprobs, advantages, values, old_values, returns, entropy, mask = cast
    loss, stats = torch.ops.fastrlhf.ppo_loss_fwd(
        logprobs, old_logprobs, advantages, values, old_values, returns, mask, entropy,
        float(clip_range), float(clip_range_value), float(vf_coef), float(ent_coef),
    )  # fmt: skip
    return loss.to(out_dtype), dict(zip(PPO_STATS, stats.unbind(0)))
