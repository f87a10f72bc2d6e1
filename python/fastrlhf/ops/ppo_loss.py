"""PPO's clipped surrogate + clipped value loss and its statistics in one fused pass.

The kernel returns, with the loss and the statistics, d loss / d (logprobs, values, entropy) for a
unit upstream gradient, computed in the same pass over the tokens: the loss is a scalar, so backward
only scales them by grad_loss (ppo_loss_bwd, on the calling thread), or hands them out as they are
when grad_loss is 1 and the graph is not kept. Eager calls go through PpoLossFunction, which calls
the raw op below the Autograd dispatch key; the raw op's own autograd formula (register_autograd,
the same math) is what torch.compile and opcheck use. Why two routes: register_autograd's generic
Python glue (an autograd.Function built per op, fill_defaults, redispatch) cost about as much as the
fused kernel itself at (64, 512).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from fastrlhf._ext import HAS_EXT
from fastrlhf.ops import reference
from fastrlhf.ops._checks import same_device
from fastrlhf.ops.reference import PPO_STATS

# Whether the running backward keeps its graph (retain_graph=True); absent from some torch builds.
_keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)

if HAS_EXT:
    _fwd = torch.ops.fastrlhf.ppo_loss_fwd.default
    _bwd = torch.ops.fastrlhf.ppo_loss_bwd.default

    def _input_grads(grads: Tensor, grad_loss: Tensor, has_entropy: bool) -> tuple:
        """d loss / d (logprobs, values, entropy or None): the unit-gradient rows (K, B, T) x grad_loss."""
        d = _bwd(grads, grad_loss).unbind(0)  # K x (B, T), in the loss's dtype
        return d[0], d[1], d[2] if has_entropy else None

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
        need_grads: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        acc = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
        k = 3 if entropy is not None else 2
        grads = logprobs.new_empty((k, *logprobs.shape) if need_grads else (0,), dtype=acc)  # (K, B, T)
        return logprobs.new_empty(()), logprobs.new_empty((len(PPO_STATS),), dtype=acc), grads  # loss, stats

    @torch.library.register_fake("fastrlhf::ppo_loss_bwd")
    def _bwd_fake(grads: Tensor, grad_loss: Tensor) -> Tensor:
        return grads.new_empty(grads.shape, dtype=grad_loss.dtype)  # (K, B, T)

    def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        ctx.save_for_backward(output[2])
        ctx.has_entropy = inputs[7] is not None
        ctx.mark_non_differentiable(output[1], output[2])  # stats, grads

    def _backward(ctx, grad_loss, _grad_stats, _grad_grads):  # type: ignore[no-untyped-def]
        (grads,) = ctx.saved_tensors
        if grads.numel() == 0:
            raise RuntimeError("fastrlhf::ppo_loss_fwd ran with need_grads=False: no gradients to give")
        d_lp, d_v, d_ent = _input_grads(grads, grad_loss, ctx.has_entropy)
        return d_lp, None, None, d_v, None, None, None, d_ent, None, None, None, None, None

    torch.library.register_autograd("fastrlhf::ppo_loss_fwd", _backward, setup_context=_setup_context)

    class PpoLossFunction(torch.autograd.Function):
        """Eager autograd around the raw op (first derivatives only)."""

        @staticmethod
        def forward(ctx, *args: Any) -> tuple[Tensor, Tensor]:  # type: ignore[override]
            # args: the 8 tensors of ppo_loss_fwd (entropy may be None), then its 4 coefficients
            with torch._C._AutoDispatchBelowAutograd():  # skip the op's Python autograd kernel
                loss, stats, grads = _fwd(*args, True)
            ctx.grads, ctx.has_entropy = grads, args[7] is not None  # an intermediate: kept on ctx
            ctx.mark_non_differentiable(stats)
            return loss, stats

        @staticmethod
        @once_differentiable
        def backward(ctx, grad_loss: Tensor, _grad_stats: Tensor) -> tuple:  # type: ignore[override]
            grads = ctx.grads
            if (
                _keep_graph is not None
                and not _keep_graph()
                and grads.dtype == grad_loss.dtype
                and grad_loss.is_cpu
                and grad_loss.item() == 1.0
            ):
                # loss.backward(): the kernel's gradients are the answer as they are (the graph is
                # freed after this pass, so no later backward can see the buffer the caller now owns)
                d = grads.unbind(0)  # K x (B, T)
                d_lp, d_v, d_ent = d[0], d[1], d[2] if ctx.has_entropy else None
            else:
                d_lp, d_v, d_ent = _input_grads(grads, grad_loss, ctx.has_entropy)
            return d_lp, None, None, d_v, None, None, None, d_ent, None, None, None, None


def _common_dtype(logprobs: Tensor, others: tuple[Tensor | None, ...], mask: Tensor) -> torch.dtype | None:
    """None when every float input already has logprobs' dtype; else the dtype to compute in
    (the reference's: float64 for float64 logprobs, otherwise float32)."""
    dt = logprobs.dtype
    if all(t is None or t.dtype is dt for t in others) and (mask.dtype is dt or not mask.is_floating_point()):
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
    all_cpu = logprobs.is_cpu and old_logprobs.is_cpu and advantages.is_cpu and values.is_cpu
    all_cpu = all_cpu and old_values.is_cpu and returns.is_cpu and mask.is_cpu
    all_cpu = all_cpu and (entropy is None or entropy.is_cpu)
    if not all_cpu:  # is_cpu is cheaper than comparing devices; same_device names the odd one out
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
    args = (logprobs, old_logprobs, advantages, values, old_values, returns, mask, entropy)
    coefs = (float(clip_range), float(clip_range_value), float(vf_coef), float(ent_coef))
    diff = (logprobs, values) if entropy is None else (logprobs, values, entropy)
    need_grads = torch.is_grad_enabled() and any(t.requires_grad for t in diff)
    if torch.compiler.is_compiling():  # the registered autograd formula, which dynamo traces
        loss, stats, _ = torch.ops.fastrlhf.ppo_loss_fwd(*args, *coefs, need_grads)
    elif need_grads:
        loss, stats = PpoLossFunction.apply(*args, *coefs)
    else:
        with torch._C._AutoDispatchBelowAutograd():
            loss, stats, _ = _fwd(*args, *coefs, False)
    return loss if loss.dtype is out_dtype else loss.to(out_dtype), dict(zip(PPO_STATS, stats.unbind(0)))
