"""Pure-PyTorch ground truth for every fused op: the tests and benchmarks compare against these,
and the public ops fall back to them when the extension is absent. Written for clarity, not speed."""

from __future__ import annotations

import torch
from torch import Tensor


def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """GAE as the reverse loop TRL/OpenRLHF/cleanrl write, vectorised over rows.

    V_{t+1} and A_{t+1} count as 0 past the last masked-in token of each row (arXiv 1506.02438, eq. 16).
    """
    B, T = rewards.shape
    mask = mask.bool()
    t_idx = torch.arange(T, device=rewards.device)
    last = torch.where(mask, t_idx, -1).amax(dim=1) if T > 0 else torch.full((B,), -1)  # (B,)
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        live = t <= last  # (B,)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = torch.where(live, delta + gamma * lam * next_adv, 0)
        next_value = torch.where(live, values[:, t], 0)
        advantages[:, t] = next_adv
    returns = advantages + values
    zero = torch.zeros((), dtype=rewards.dtype)
    return torch.where(mask, advantages, zero), torch.where(mask, returns, zero)
