"""The critic-free policy loss (GRPO, Dr. GRPO, DAPO, RLOO, REINFORCE++) and its statistics in one fused pass.

The machinery is ppo_loss's (see its docstring): the kernel returns, with the loss and the statistics,
d loss / d (logprobs, entropy) for a unit upstream gradient, computed in the same pass over the tokens;
backward scales them by grad_loss with ppo_loss's scale op (torch.ops.fastrlhf.ppo_loss_bwd), or hands
them out as they are when grad_loss is 1 and the graph is not kept. Eager calls go through
PolicyLossFunction; torch.compile and opcheck use the raw op's registered autograd formula.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from fastrlhf._ext import HAS_EXT
from fastrlhf.ops import reference
from fastrlhf.ops._checks import same_device
from fastrlhf.ops.ppo_loss import _common_dtype, _keep_graph
from fastrlhf.ops.reference import POLICY_AGGS, POLICY_STATS

if HAS_EXT:
    _fwd = torch.ops.fastrlhf.policy_loss_fwd.default
    _scale = torch.ops.fastrlhf.ppo_loss_bwd.default  # grads (K, B, T) x grad_loss, in grad_loss's dtype

    def _input_grads(grads: Tensor, grad_loss: Tensor, has_entropy: bool) -> tuple:
        """d loss / d (logprobs, entropy or None): the unit-gradient rows (K, B, T) x grad_loss."""
        d = _scale(grads, grad_loss).unbind(0)  # K x (B, T), in the loss's dtype
        return d[0], d[1] if has_entropy else None

    @torch.library.register_fake("fastrlhf::policy_loss_fwd")
    def _fwd_fake(
        logprobs: Tensor,
        old_logprobs: Tensor,
        advantages: Tensor,
        mask: Tensor,
        ref_logprobs: Tensor | None,
        entropy: Tensor | None,
        eps_low: float,
        eps_high: float,
        agg: int,
        beta: float,
        max_len: int,
        ent_coef: float,
        need_grads: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        acc = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
        k = 2 if entropy is not None else 1
        grads = logprobs.new_empty((k, *logprobs.shape) if need_grads else (0,), dtype=acc)  # (K, B, T)
        return (
            logprobs.new_empty(()),
            logprobs.new_empty((len(POLICY_STATS),), dtype=acc),
            grads,
        )  # loss, stats

    def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        ctx.save_for_backward(output[2])
        ctx.has_entropy = inputs[5] is not None
        ctx.mark_non_differentiable(output[1], output[2])  # stats, grads

    def _backward(ctx, grad_loss, _grad_stats, _grad_grads):  # type: ignore[no-untyped-def]
        (grads,) = ctx.saved_tensors
        if grads.numel() == 0 and grads.dim() == 1:
            raise RuntimeError("fastrlhf::policy_loss_fwd ran with need_grads=False: no gradients to give")
        d_lp, d_ent = _input_grads(grads, grad_loss, ctx.has_entropy)
        return d_lp, None, None, None, None, d_ent, None, None, None, None, None, None, None

    torch.library.register_autograd("fastrlhf::policy_loss_fwd", _backward, setup_context=_setup_context)

    class PolicyLossFunction(torch.autograd.Function):
        """Eager autograd around the raw op (first derivatives only)."""

        @staticmethod
        def forward(ctx, *args: Any) -> tuple[Tensor, Tensor]:  # type: ignore[override]
            # args: the 6 tensors of policy_loss_fwd (ref_logprobs, entropy may be None), then its 6 numbers
            with torch._C._AutoDispatchBelowAutograd():  # skip the op's Python autograd kernel
                loss, stats, grads = _fwd(*args, True)
            ctx.grads, ctx.has_entropy = grads, args[5] is not None  # an intermediate: kept on ctx
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
                d_lp, d_ent = d[0], d[1] if ctx.has_entropy else None
            else:
                d_lp, d_ent = _input_grads(grads, grad_loss, ctx.has_entropy)
            return d_lp, None, None, None, None, d_ent, None, None, None, None, None, None


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    agg: str = "token_mean",
    ref_logprobs: Tensor | None = None,
    beta: float = 0.0,
    max_len: int | None = None,
    entropy: Tensor | None = None,
    ent_coef: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped policy loss of the critic-free algorithms, over (B, T) tokens.

    Per token l = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), r = exp(logprobs - old_logprobs)
    (eps_high > eps_low is DAPO's clip-higher, arXiv 2503.14476), + beta k3(ref) when beta > 0
    (k3 = e^d - d - 1, d = ref_logprobs - logprobs: GRPO, arXiv 2402.03300), - ent_coef H when ent_coef > 0.
    advantages: (B, T), or (B,) one per sequence (GRPO, RLOO), broadcast over its tokens. mask: bool, or
    float weights of logprobs' dtype. agg (reference.POLICY_AGGS):
      token_mean               sum of m l / sum of m (DAPO; the default)
      seq_mean_token_mean      mean over rows of each row's token mean (the original GRPO)
      seq_mean_token_sum_norm  mean over rows of each row's token sum / max_len (Dr. GRPO, arXiv 2503.20783;
                               max_len, only for this mode, defaults to T: pass the generation budget to
                               keep it constant across batches)
    The means over rows count only rows with a masked-in token (all-masked rows add nothing and do not
    dilute the mean); a batch with no masked-in token gives loss 0, zero gradients and zero stats.
    Returns the loss in logprobs' dtype and stats: reference.POLICY_STATS as 0-dim tensors (float32, or
    float64 for float64 logprobs), masked token means (kl: k3 to the reference when ref_logprobs is given,
    else 0; clipfrac_low / _high: tokens where the clip is active, r < 1 - eps_low with A < 0 / r >
    1 + eps_high with A > 0). Differentiable in logprobs and entropy. Float inputs of mixed dtypes are
    computed in float32 (float64 if logprobs is float64), as the reference does.
    """
    if agg not in POLICY_AGGS:
        raise ValueError(f"agg must be one of {', '.join(POLICY_AGGS)}; got {agg!r}")
    if max_len is not None and agg != "seq_mean_token_sum_norm":
        raise ValueError(
            f"max_len is only used by agg='seq_mean_token_sum_norm'; got max_len={max_len} with {agg=}"
        )
    if max_len is not None and (not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1):
        raise ValueError(f"max_len must be an int >= 1; got {max_len!r}")
    all_cpu = logprobs.is_cpu and old_logprobs.is_cpu and advantages.is_cpu and mask.is_cpu
    all_cpu = (
        all_cpu and (ref_logprobs is None or ref_logprobs.is_cpu) and (entropy is None or entropy.is_cpu)
    )
    if not all_cpu:  # is_cpu is cheaper than comparing devices; same_device names the odd one out
        same_device(
            logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask,
            ref_logprobs=ref_logprobs, entropy=entropy,
        )  # fmt: skip
    if not HAS_EXT:
        return reference.policy_loss(
            logprobs, old_logprobs, advantages, mask, eps_low=eps_low, eps_high=eps_high, agg=agg,
            ref_logprobs=ref_logprobs, beta=beta, max_len=max_len, entropy=entropy, ent_coef=ent_coef,
        )  # fmt: skip
    if max_len is None:  # T; a batch with T = 0 has no token to divide
        max_len = max(logprobs.shape[-1], 1) if logprobs.dim() > 0 else 1
    out_dtype = logprobs.dtype
    others = (old_logprobs, advantages, ref_logprobs, entropy)
    dt = _common_dtype(logprobs, others, mask)
    if dt is not None:  # autograd casts the gradients back to each input's dtype
        cast = [t.to(dt) if t is not None and t.is_floating_point() else t for t in (logprobs, *others, mask)]
        logprobs, old_logprobs, advantages, ref_logprobs, entropy, mask = cast
    args = (logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy)
    nums = (float(eps_low), float(eps_high), POLICY_AGGS.index(agg), float(beta), max_len, float(ent_coef))
    need_grads = torch.is_grad_enabled() and (
        logprobs.requires_grad or (entropy is not None and entropy.requires_grad)
    )
    if torch.compiler.is_compiling():  # the registered autograd formula, which dynamo traces
        loss, stats, _ = torch.ops.fastrlhf.policy_loss_fwd(*args, *nums, need_grads)
    elif need_grads:
        loss, stats = PolicyLossFunction.apply(*args, *nums)
    else:
        with torch._C._AutoDispatchBelowAutograd():
            loss, stats, _ = _fwd(*args, *nums, False)
    return loss if loss.dtype is out_dtype else loss.to(out_dtype), dict(zip(POLICY_STATS, stats.unbind(0)))
