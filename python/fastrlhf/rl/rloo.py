"""RLOO, REINFORCE Leave-One-Out (Ahmadian et al. 2024, arXiv 2402.14740), on the critic-free trainer
(rl/critic_free.py): k answers per prompt; each answer's reward is its score minus kl_coef times its
sequence KL to the reference (k1, summed over its tokens, as PPO's reward shaping); its advantage is that
reward minus the mean of the other k - 1 answers' (rl/advantages.py); the update is PPO's clipped one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from fastrlhf.config import INF, check_range
from fastrlhf.models.lora import LoraConfig
from fastrlhf.rl.advantages import leave_one_out_advantages
from fastrlhf.rl.critic_free import CriticFreeHyperConfig, CriticFreeTrainConfig, CriticFreeTrainer
from fastrlhf.rl.kl import kl_penalty
from fastrlhf.rl.rollout import Samples
from fastrlhf.train.optim import OptimConfig


@dataclass
class RLOOHyperConfig(CriticFreeHyperConfig):
    SECTION: ClassVar[str] = "rloo"

    kl_coef: float = 0.05
    """Weight of the sequence KL (k1) to the reference in each answer's reward; 0 = no reference loaded."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("rloo.kl_coef", self.kl_coef, 0.0, INF, hi_open=True)

    def kl_setting(self) -> tuple[str, float]:
        return "rloo.kl_coef", self.kl_coef


@dataclass
class RLOOTrainConfig(CriticFreeTrainConfig):
    out_dir: str = "runs/rloo"


def _optim() -> OptimConfig:
    return OptimConfig(lr=1e-5, min_lr=1e-6, warmup_steps=0, weight_decay=0.0)


@dataclass
class RLOOConfig:
    policy: str = ""
    """The model to train: a run or stage folder, an HF folder, a .gguf file or a known name."""
    rloo: RLOOHyperConfig = field(default_factory=RLOOHyperConfig)
    optim: OptimConfig = field(default_factory=_optim)
    train: RLOOTrainConfig = field(default_factory=RLOOTrainConfig)
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(r=0))
    """LoRA adapters on the policy (lora.r > 0): the base frozen, and the reference is the base itself with the
    adapters switched off (no second copy in memory)."""

    @property
    def hyper(self) -> RLOOHyperConfig:
        return self.rloo


def sequence_kl(logprobs: Tensor, ref: Tensor | None, mask: Tensor) -> Tensor:
    """(B,) k1 KL to the reference summed over each answer's tokens (0 without a reference)."""
    if ref is None:
        return torch.zeros(mask.shape[0], device=mask.device)
    return (kl_penalty(logprobs, ref, "k1") * mask).sum(dim=1).float()


class RLOOTrainer(CriticFreeTrainer):
    """RLOO on `policy` (ref: the frozen reference, needed only when kl_coef > 0)."""

    desc = "rloo"
    h: RLOOHyperConfig

    def advantages(
        self, scores: Tensor, s: Samples, mask: Tensor, ref: Tensor | None
    ) -> tuple[Tensor, dict[str, float]]:
        kl = sequence_kl(s.logprobs, ref, s.mask)  # (B,) the sampler's log-probs: pi_old = pi here
        rewards = scores - self.h.kl_coef * kl  # (B,) the KL folded into the sequence reward
        A = leave_one_out_advantages(rewards, self.h.group_size)  # (B,)
        return A, {"kl_ref": kl.mean().item(), "rlhf_reward": rewards.mean().item()}
