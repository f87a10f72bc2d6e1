"""The LM head fused with the next-token loss: F.cross_entropy(hidden @ weight.T, targets) without the
(N, V) logits.

At GPT-2's V = 50257 the logits of a (8, 256) batch are 411 MB of fp32, which the plain path allocates
twice (logits, their gradient; each a fresh mapping whose page faults alone cost ~0.2 s a core) and
streams through memory five times. Here rows go in chunks: the chunk's logits GEMM, then
`token_logprobs_grad_` turns them in place into d loss / d logits, then the two backward GEMMs
(d hidden, and d weight accumulated chunk by chunk). The gradients are computed in the forward, since
the loss is a scalar and the upstream gradient only scales them (as in Liger-Kernel's fused linear
cross entropy); the backward multiplies. Same FLOPs as the plain path, one chunk buffer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastrlhf._ext import HAS_EXT
from fastrlhf.ops._checks import same_device
from fastrlhf.ops.logprobs import token_logprobs

CHUNK_ROWS = 512  # (512, 50257) fp32 = 103 MB: big enough for GEMM efficiency, 1/4 of the logits

if HAS_EXT:

    @torch.library.register_fake("fastrlhf::token_logprobs_grad_")
    def _grad_fake(logits: Tensor, targets: Tensor, scale: float) -> Tensor:
        return logits.new_empty(logits.shape[:1])  # (N,) log-probs; logits is overwritten in place


def _check(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"hidden must be (N, C) and weight (V, C); got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if hidden.dtype not in (torch.float32, torch.float64) or weight.dtype != hidden.dtype:
        raise ValueError(
            f"hidden and weight must both be float32 or float64; got {hidden.dtype}, {weight.dtype}"
        )
    if hidden.device.type != "cpu":
        raise ValueError(f"linear_cross_entropy runs on the CPU; got {hidden.device}")
    if targets.dtype != torch.long or tuple(targets.shape) != (hidden.shape[0],):
        raise ValueError(
            f"targets must be (N,) = ({hidden.shape[0]},) int64; got {tuple(targets.shape)} {targets.dtype}"
        )
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1; got {chunk_rows}")


# A Python custom op (the GEMMs are torch's): opaque to torch.compile, with a fake and an autograd formula.
@torch.library.custom_op("fastrlhf::linear_cross_entropy_fwd", mutates_args=())
def _fwd(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    ignore_index: int,
    need_grads: bool,
    chunk_rows: int,
    weight_grad: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """loss (), and when need_grads d loss / d hidden (N, C) and (if weight_grad) d loss / d weight (V, C),
    else (0,) each. A frozen weight (LoRA's base, say) skips the (V, C) GEMMs of its gradient."""
    _check(hidden, weight, targets, chunk_rows)
    (N, C), V = hidden.shape, weight.shape[0]
    keep = targets != ignore_index  # (N,)
    bad = (keep & ((targets < 0) | (targets >= V))).nonzero()  # (k, 1): checked here to name the position
    if len(bad):
        i = int(bad[0, 0])
        raise ValueError(f"targets must be in [0, V) = [0, {V}); got {int(targets[i])} at position ({i})")
    # (n,) the kept rows: ignored ones cost no GEMM
    rows = None if bool(keep.all()) else keep.nonzero().squeeze(1)
    h = hidden if rows is None else hidden.index_select(0, rows)  # (n, C)
    t = targets if rows is None else targets.index_select(0, rows)  # (n,)
    n = h.shape[0]
    d_h = h.new_empty((n, C) if need_grads else (0,))  # outputs may not alias: two (0,) tensors otherwise
    d_w = weight.new_empty((0,))
    if (
        need_grads and weight_grad
    ):  # (V, C); written by the first chunk's GEMM, so zeros only when there is none
        d_w = weight.new_empty((V, C)) if n else weight.new_zeros((V, C))
    buf = h.new_empty((min(chunk_rows, n), V))  # (R, V): one chunk's logits, then their gradient
    total = torch.zeros((), dtype=torch.float64)
    for i in range(0, n, chunk_rows):
        h_c, t_c = h[i : i + chunk_rows], t[i : i + chunk_rows]  # (r, C), (r,)
        logits = buf[: h_c.shape[0]]  # (r, V)
        torch.mm(h_c, weight.t(), out=logits)
        if need_grads:  # loss = -mean log p: d loss / d logits = -(onehot - p) / n, written over the logits
            lp = torch.ops.fastrlhf.token_logprobs_grad_(logits, t_c, -1.0 / n)  # (r,)
            torch.mm(logits, weight, out=d_h[i : i + chunk_rows])
            if weight_grad and i == 0:  # (V, C): written by the first chunk, accumulated by the others
                torch.mm(logits.t(), h_c, out=d_w)
            elif weight_grad:
                d_w.addmm_(logits.t(), h_c)
        else:
            lp = torch.ops.fastrlhf.token_logprobs_fwd(logits, t_c, 1.0, False)[0]  # (r,)
        total += lp.sum(dtype=torch.float64)
    loss = (-total / n).to(hidden.dtype)  # NaN when no target is kept, as F.cross_entropy
    if need_grads and rows is not None:
        d_h = hidden.new_zeros((N, C)).index_copy_(0, rows, d_h)  # ignored rows get no gradient
    return loss, d_h, d_w


@_fwd.register_fake
def _fwd_fake(hidden, weight, targets, ignore_index, need_grads, chunk_rows, weight_grad=True):  # type: ignore[no-untyped-def]
    _check(hidden, weight, targets, chunk_rows)
    d_h = hidden.new_empty(hidden.shape if need_grads else (0,))
    return hidden.new_empty(()), d_h, weight.new_empty(weight.shape if need_grads and weight_grad else (0,))


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    _, d_h, d_w = output
    ctx.need_grads, ctx.weight_grad = inputs[4], inputs[6]
    ctx.save_for_backward(d_h, d_w)
    ctx.mark_non_differentiable(d_h, d_w)
    ctx.set_materialize_grads(False)  # else autograd fills (N, C) and (V, C) zeros for the unused outputs


def _backward(ctx, grad_loss, _grad_dh, _grad_dw):  # type: ignore[no-untyped-def]
    if not ctx.need_grads:
        raise RuntimeError("linear_cross_entropy was called with need_grads=False; it has no gradient")
    if grad_loss is None:
        return None, None, None, None, None, None, None
    d_h, d_w = ctx.saved_tensors
    if not ctx.weight_grad:
        d_w = None
    eager = type(grad_loss) is Tensor and not torch.compiler.is_compiling()  # not fake/functional/traced
    if eager and grad_loss.item() == 1.0:
        # loss.backward() seeds 1: skip a pass over (V, C). Returning the saved tensors is safe: autograd
        # only adds into a gradient in place when nothing else holds it (not with retain_graph)
        return d_h, d_w, None, None, None, None, None
    return grad_loss * d_h, None if d_w is None else grad_loss * d_w, None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def _plain(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
    """The unfused path: logits (..., V), then ops.token_logprobs (one pass; bf16 sums in fp32)."""
    logits = hidden @ weight.t()  # (..., V)
    keep = targets != ignore_index  # (...)
    lp = token_logprobs(logits, torch.where(keep, targets, 0))  # (...)
    if lp.dtype != torch.float64:
        lp = lp.float()
    n = keep.sum()
    loss = -(lp * keep).sum() / n.clamp(min=1)
    # no kept target: NaN, with zero gradients (as F.cross_entropy and the fused path; 0 / 0 gave NaN ones)
    return torch.where(n > 0, loss, torch.full_like(loss, float("nan")))


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, *, ignore_index: int = -100, chunk_rows: int = CHUNK_ROWS
) -> Tensor:
    """F.cross_entropy(hidden @ weight.T, targets, ignore_index=ignore_index): the mean over kept targets
    (NaN when none is kept), differentiable in hidden and weight.

    hidden (..., C) and weight (V, C) float32/float64 on the CPU; targets (...) int64 in [0, V) or
    ignore_index. Never holds more than chunk_rows x V logits. Other devices and dtypes (CUDA, bf16)
    take the plain path: the logits, then ops.token_logprobs.
    """
    same_device(hidden=hidden, weight=weight, targets=targets)
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets must have the shape of hidden.shape[:-1] {tuple(hidden.shape[:-1])}; "
            f"got {tuple(targets.shape)}"
        )
    if weight.dtype != hidden.dtype:  # else torch's matmul raises a RuntimeError on the plain path
        raise ValueError(
            f"hidden and weight must have the same dtype; got hidden {hidden.dtype}, weight {weight.dtype}"
        )
    fused = HAS_EXT and hidden.device.type == "cpu" and hidden.dtype in (torch.float32, torch.float64)
    if not fused:
        return _plain(hidden, weight, targets, ignore_index)
    need_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    flat_h = hidden.reshape(-1, hidden.shape[-1])  # (N, C)
    return _fwd(
        flat_h, weight, targets.reshape(-1), ignore_index, need_grads, chunk_rows, weight.requires_grad
    )[0]
