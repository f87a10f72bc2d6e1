"""rl.advantages: GRPO (group / batch / no scaling), RLOO's leave-one-out baseline, the zero-variance
groups dynamic sampling drops, REINFORCE++'s whitened returns: against the formulas written out."""

import pytest
import torch
from fastrlhf.rl.advantages import (
    group_advantages,
    leave_one_out_advantages,
    reinforce_pp_returns,
    zero_variance_groups,
)

R = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.5, -0.5, 1.5, 0.0], dtype=torch.float64)  # 3 x 4


def test_group_advantages_three_scalings():
    g = R.view(3, 4)
    mean, std = g.mean(1, keepdim=True), g.std(1, keepdim=True)
    torch.testing.assert_close(group_advantages(R, 4, "none"), (g - mean).reshape(-1))
    torch.testing.assert_close(group_advantages(R, 4, "group"), ((g - mean) / (std + 1e-6)).reshape(-1))
    torch.testing.assert_close(group_advantages(R, 4, "batch"), ((g - mean) / (R.std() + 1e-6)).reshape(-1))
    assert group_advantages(R, 4, "group")[4:8].abs().max() == 0  # a tied group carries no signal


def test_leave_one_out_baseline():
    want = torch.stack([R[i] - (R[4 * (i // 4) : 4 * (i // 4) + 4].sum() - R[i]) / 3 for i in range(12)])
    torch.testing.assert_close(leave_one_out_advantages(R, 4), want)
    assert zero_variance_groups(R, 4).tolist() == [False, True, False]


def test_reinforce_pp_returns_are_whitened_sums_to_the_end():
    rewards = torch.tensor([[0.1, -0.2, 1.0, 0.0], [0.0, 0.3, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    returns = torch.tensor([[0.9, 0.8, 1.0, 0.0], [0.3, 0.3, 0.0, 0.0]], dtype=torch.float64)
    kept = returns[mask]
    want = torch.where(mask, (returns - kept.mean()) / (kept.std() + 1e-8), 0.0)
    torch.testing.assert_close(reinforce_pp_returns(rewards, mask), want)
    assert reinforce_pp_returns(rewards, torch.zeros_like(mask)).abs().sum() == 0


def test_bad_groups_are_named():
    with pytest.raises(
        ValueError, match=r"group size must be >= 2 \(a baseline needs other samples\); got 1"
    ):
        group_advantages(R, 1)
    with pytest.raises(ValueError, match=r"rewards must be \(n_prompts \* 5,\)"):
        group_advantages(R, 5)
    with pytest.raises(ValueError, match="scale_rewards must be one of"):
        group_advantages(R, 4, "std")
