"""Masked statistics over the response tokens of a batch: means, variances, whitening, the critic's
explained variance, and their all-ranks twins under torchrun (the whitening and the metrics must see the
whole batch, not one rank's share)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fastrlhf.train import dist


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def masked_var(x: Tensor, mask: Tensor) -> Tensor:
    """Unbiased variance over the masked-in entries (0 for fewer than two)."""
    m = mask.to(x.dtype)
    n = m.sum()
    mean = (x * m).sum() / n.clamp(min=1)
    return (((x - mean) ** 2) * m).sum() / (n - 1).clamp(min=1)


def masked_moments(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(masked_mean, masked_var) of this process's x; global_masked_moments is the all-ranks twin."""
    return masked_mean(x, mask), masked_var(x, mask)


def global_masked_moments(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, unbiased variance) of x over the masked-in entries of every rank: two all-reduces of sums
    (two passes, like masked_var, so no catastrophic cancellation). masked_moments on one process."""
    if not dist.active():
        return masked_moments(x, mask)
    m = mask.to(x.dtype)
    s = dist.all_sum(torch.stack([(x * m).sum(), m.sum()]))  # (2,) sum, count
    mean = s[0] / s[1].clamp(min=1)
    sq = dist.all_sum(((x - mean) ** 2 * m).sum())
    return mean, sq / (s[1] - 1).clamp(min=1)


Moments = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def masked_whiten(
    x: Tensor, mask: Tensor, shift_mean: bool = True, moments: Moments = masked_moments
) -> Tensor:
    """(x - mean) / std over the masked-in entries, 0 elsewhere; shift_mean=False keeps the mean
    (reward whitening must not change the reward's sign on average, as in lm-human-preferences).
    moments(x, mask) -> (mean, var) decides over which entries (this process's, or every rank's)."""
    mean, var = moments(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros((), dtype=x.dtype))


def explained_variance(
    values: Tensor, returns: Tensor, mask: Tensor, moments: Moments = masked_moments
) -> float:
    """1 - Var(returns - values) / Var(returns) over the mask: 1 = perfect critic, <= 0 = useless."""
    var_ret = moments(returns, mask)[1]
    return float(1 - moments(returns - values, mask)[1] / var_ret) if var_ret > 0 else float("nan")
