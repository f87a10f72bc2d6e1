"""Plain tensor helpers for the PPO trainer: masked statistics, the per-token KL penalty, the reward
shaping of InstructGPT/Ziegler et al., and the KL coefficient controllers."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

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


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (B, T).
    k1 = log pi - log pi_ref (unbiased, can be negative); k3 = (r - 1) - log r with r = pi_ref / pi
    (unbiased, always >= 0, lower variance). http://joschu.net/blog/kl-approx.html"""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl estimator must be 'k1' or 'k3'; got {estimator!r}")


def shape_rewards(score: Tensor, kl: Tensor, kl_coef: float, mask: Tensor) -> Tensor:
    """(B, T) rewards = -kl_coef * kl at every response token, plus the score (B,) at each row's last
    response token (arXiv 1909.08593 eq. 2; InstructGPT eq. 2)."""
    rewards = -kl_coef * kl * mask
    T = mask.shape[1]
    last = torch.where(mask.bool(), torch.arange(T, device=mask.device), -1).amax(dim=1)  # (B,)
    rows = torch.nonzero(last >= 0).squeeze(1)
    rewards[rows, last[rows]] += score[rows].to(rewards.dtype)
    return rewards


class KLController:
    """A fixed kl_coef. `update(kl, n)` is told the mean sequence KL of a batch of n episodes."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(KLController):
    """Ziegler et al. 2019 (arXiv 1909.08593, section 2.2): a proportional controller that moves
    kl_coef so the KL approaches `target`: e = clip(KL / target - 1, -0.2, 0.2);
    kl_coef *= 1 + e * n_steps / horizon."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        super().__init__(kl_coef)
        self.target, self.horizon = target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        if not math.isfinite(kl):
            return  # a non-finite step is skipped; it must not poison the coefficient
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
