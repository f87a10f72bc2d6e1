"""Per-token log-probabilities (and entropies) of softmax(logits / T), streaming each row once."""

from __future__ import annotations

import torch
from torch import Tensor

from fastrlhf._ext import HAS_EXT
from fastrlhf.ops import reference
from fastrlhf.ops._checks import same_device

if HAS_EXT:

    @torch.library.register_fake("fastrlhf::token_logprobs_fwd")
    def _fwd_fake(
        logits: Tensor, targets: Tensor, temperature: float, return_entropy: bool
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        lead = logits.shape[:-1]  # (...)
        per_row = lead if return_entropy else (0,)  # entropy outputs are empty when not requested
        # Saved for the backward, float64 for every dtype and relative to each row's max logit M, so that
        # nothing is lost at any magnitude (csrc/logprobs/logprobs.h): with d = (logits - M) / T,
        # lse (..., 2) holds (M, log sum e^d) and mean_scaled (...) holds E_p[d].
        return (
            logits.new_empty(lead),  # logprobs
            logits.new_empty(per_row),  # entropy
            logits.new_empty((*lead, 2), dtype=torch.float64),  # lse: M, log S
            logits.new_empty(per_row, dtype=torch.float64),  # mean_scaled: E_p[d]
        )

    @torch.library.register_fake("fastrlhf::token_logprobs_bwd")
    def _bwd_fake(
        grad_logprobs: Tensor | None,
        grad_entropy: Tensor | None,
        logits: Tensor,
        targets: Tensor,
        lse: Tensor,
        mean_scaled: Tensor,
        temperature: float,
    ) -> Tensor:
        return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)  # (..., V) contiguous

    def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        logits, targets, temperature, return_entropy = inputs
        _, _, lse, mean_scaled = output
        ctx.save_for_backward(logits, targets, lse, mean_scaled)
        ctx.temperature = temperature
        ctx.return_entropy = return_entropy
        ctx.mark_non_differentiable(lse, mean_scaled)
        ctx.set_materialize_grads(False)  # an unused output's grad arrives as None: its term is skipped

    def _backward(ctx, grad_logprobs, grad_entropy, _grad_lse, _grad_mean):  # type: ignore[no-untyped-def]
        if not ctx.return_entropy:
            grad_entropy = None
        if grad_logprobs is None and grad_entropy is None:
            return None, None, None, None
        logits, targets, lse, mean_scaled = ctx.saved_tensors
        d_logits = torch.ops.fastrlhf.token_logprobs_bwd(
            grad_logprobs, grad_entropy, logits, targets, lse, mean_scaled, ctx.temperature
        )
        return d_logits, None, None, None

    torch.library.register_autograd("fastrlhf::token_logprobs_fwd", _backward, setup_context=_setup_context)


def token_logprobs(
    logits: Tensor, targets: Tensor, *, temperature: float = 1.0, return_entropy: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """log softmax(logits / temperature)[targets] over the last dim, and optionally the entropy.

    logits (..., V) float32/float64/bfloat16/float16; targets (...) int64 in [0, V). Outputs have
    shape (...) and logits' dtype; math is fp32 (fp64 for float64). Differentiable in logits through
    both outputs; the backward writes the (..., V) gradient in one pass and is the only (N, V)
    allocation. Views whose last dim is contiguous (e.g. logits[:, :-1]) are read without a copy.
    """
    same_device(logits=logits, targets=targets)
    if HAS_EXT:
        logprobs, entropy, _, _ = torch.ops.fastrlhf.token_logprobs_fwd(
            logits, targets, float(temperature), bool(return_entropy)
        )
        return (logprobs, entropy) if return_entropy else logprobs
    return reference.token_logprobs(logits, targets, temperature=temperature, return_entropy=return_entropy)
