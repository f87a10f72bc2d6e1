"""Generalized Advantage Estimation as one fused pass per row."""

from __future__ import annotations

import torch
from torch import Tensor

from fastrlhf._ext import HAS_EXT
from fastrlhf.ops import reference
from fastrlhf.ops._checks import same_device

if HAS_EXT:

    @torch.library.register_fake("fastrlhf::gae")
    def _gae_fake(
        rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
    ) -> tuple[Tensor, Tensor]:
        return torch.empty_like(rewards), torch.empty_like(rewards)


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Advantages and returns, (B, T) each; both 0 where mask is 0.

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, where V_{t+1} and
    A_{t+1} count as 0 past the last masked-in token of the row; returns = A + V. Not differentiable
    (advantages are targets). mask may be bool or numeric (non-zero = response token).
    """
    same_device(rewards=rewards, values=values, mask=mask)
    if mask.dtype != torch.bool:
        mask = mask != 0
    if HAS_EXT:
        return torch.ops.fastrlhf.gae(rewards, values, mask, float(gamma), float(lam))
    return reference.gae(rewards, values, mask, gamma=gamma, lam=lam)
