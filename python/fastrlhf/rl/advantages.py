"""Advantages without a critic: each sample is compared with the other samples of its own prompt (a group
of G consecutive rows) or with the batch.

- GRPO (Shao et al. 2024, arXiv 2402.03300): A = (r - mean of the group) / std of the group.
  `scale`: 'group' (GRPO), 'batch' (the batch's std; Hu et al. 2025's REINFORCE++-baseline), or 'none'
  (Dr. GRPO, Liu et al. 2025, arXiv 2503.20783: the std division biases toward easy and hard prompts).
- RLOO (Ahmadian et al. 2024, arXiv 2402.14740): A_i = r_i - mean of the other k - 1 samples.
- REINFORCE++ (Hu 2025, arXiv 2501.03262): token rewards (the KL penalty at every token, the score at the
  last), returns summed to the end (gamma = 1), normalised over the batch.
Every function takes the sequence rewards (B,) of B = n_prompts x G rows, G consecutive rows per prompt."""

from __future__ import annotations

import torch
from torch import Tensor

SCALES = ("group", "batch", "none")


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    if group_size < 2:
        raise ValueError(f"group size must be >= 2 (a baseline needs other samples); got {group_size}")
    if rewards.dim() != 1 or rewards.shape[0] % group_size:
        raise ValueError(
            f"rewards must be (n_prompts * {group_size},) with each prompt's samples consecutive; "
            f"got {tuple(rewards.shape)}"
        )
    return rewards.view(-1, group_size)  # (n_prompts, G)


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-6) -> Tensor:
    """(B,) GRPO's advantages: each reward minus its group's mean, divided by the group's std ('group'),
    the batch's ('batch') or nothing ('none'). A group whose rewards are all equal gets 0."""
    if scale not in SCALES:
        raise ValueError(f"scale_rewards must be one of {list(SCALES)}; got {scale!r}")
    g = _groups(rewards, group_size)  # (n, G)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (g.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (rewards.std() + eps)
    return centred.reshape(-1)


def leave_one_out_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """(B,) RLOO's advantages: r_i minus the mean of the group's other samples, = G / (G - 1) (r_i - mean)."""
    g = _groups(rewards, group_size)  # (n, G)
    others = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - others).reshape(-1)


def zero_variance_groups(rewards: Tensor, group_size: int) -> Tensor:
    """(n_prompts,) bool: groups whose samples all got the same reward (no learning signal; DAPO's dynamic
    sampling drops and refills them, arXiv 2503.14476)."""
    g = _groups(rewards, group_size)
    return (g == g[:, :1]).all(dim=1)


def reinforce_pp_returns(token_rewards: Tensor, mask: Tensor) -> Tensor:
    """(B, T) REINFORCE++'s advantages: each token's return (the sum of the token rewards from it to the end
    of its response, gamma = 1), whitened over every masked-in token of the batch; 0 outside the mask."""
    r = token_rewards * mask
    returns = r.flip(1).cumsum(1).flip(1)  # (B, T): sum_{t' >= t}
    m = mask.bool()
    if not bool(m.any()):
        return torch.zeros_like(returns)
    mean, std = returns[m].mean(), returns[m].std() if int(m.sum()) > 1 else returns.new_tensor(1.0)
    return torch.where(m, (returns - mean) / (std + 1e-8), 0.0)


def check_groups(prompts: list[list[int]], group_size: int) -> None:
    """Every group of group_size consecutive rows must hold one prompt (its samples are its baseline)."""
    for i in range(0, len(prompts), group_size):
        if any(p != prompts[i] for p in prompts[i : i + group_size]):
            raise ValueError(
                f"group {i // group_size} (rows {i}..{i + group_size - 1}) holds different prompts; each "
                f"group's {group_size} samples must answer the same prompt"
            )
