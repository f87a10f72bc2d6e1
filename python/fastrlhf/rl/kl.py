"""The KL penalty of RLHF: per-token estimators of KL(pi || pi_ref), the reward shaping of InstructGPT /
Ziegler et al. that puts it into the rewards, and the fixed and adaptive KL-coefficient controllers."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


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
