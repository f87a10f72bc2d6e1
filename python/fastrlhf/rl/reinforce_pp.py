"""REINFORCE++ (Hu 2025, arXiv 2501.03262) on the critic-free trainer (rl/critic_free.py): token rewards
(-kl_coef times the k1 KL to the reference at every token, the score added at the last), each token's
return summed to the end of its answer (gamma = 1) and normalised over the whole batch (no per-prompt
baseline, no critic: rl/advantages.reinforce_pp_returns), and PPO's clipped update. Any group size works,
1 included."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from fastrlhf.config import INF, check_range
from fastrlhf.models.lora import LoraConfig
from fastrlhf.rl.advantages import reinforce_pp_returns
from fastrlhf.rl.critic_free import CriticFreeHyperConfig, CriticFreeTrainConfig, CriticFreeTrainer
from fastrlhf.rl.kl import kl_penalty, shape_rewards
from fastrlhf.rl.rollout import Samples
from fastrlhf.train.optim import OptimConfig


@dataclass
class ReinforcePPHyperConfig(CriticFreeHyperConfig):
    SECTION: ClassVar[str] = "reinforce_pp"
    MIN_GROUP: ClassVar[int] = 1  # the baseline is the batch's mean return

    kl_coef: float = 0.01
    """Weight of the per-token KL (k1) to the reference in the token rewards; 0 = no reference loaded."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("reinforce_pp.kl_coef", self.kl_coef, 0.0, INF, hi_open=True)

    def kl_setting(self) -> tuple[str, float]:
        return "reinforce_pp.kl_coef", self.kl_coef


@dataclass
class ReinforcePPTrainConfig(CriticFreeTrainConfig):
    out_dir: str = "runs/reinforce_pp"


def _optim() -> OptimConfig:
    return OptimConfig(lr=1e-5, min_lr=1e-6, warmup_steps=0, weight_decay=0.0)


@dataclass
class ReinforcePPConfig:
    policy: str = ""
    """The model to train: a run or stage folder, an HF folder, a .gguf file or a known name."""
    reinforce_pp: ReinforcePPHyperConfig = field(default_factory=ReinforcePPHyperConfig)
    optim: OptimConfig = field(default_factory=_optim)
    train: ReinforcePPTrainConfig = field(default_factory=ReinforcePPTrainConfig)
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(r=0))
    """LoRA adapters on the policy (lora.r > 0): the base frozen, and the reference is the base itself with the
    adapters switched off (no second copy in memory)."""

    @property
    def hyper(self) -> ReinforcePPHyperConfig:
        return self.reinforce_pp


class ReinforcePPTrainer(CriticFreeTrainer):
    """REINFORCE++ on `policy` (ref: the frozen reference, needed only when kl_coef > 0)."""

    desc = "reinforce_pp"
    h: ReinforcePPHyperConfig

    def advantages(
        self, scores: Tensor, s: Samples, mask: Tensor, ref: Tensor | None
    ) -> tuple[Tensor, dict[str, float]]:
        kl = kl_penalty(s.logprobs, ref, "k1") if ref is not None else torch.zeros_like(s.logprobs)  # (B, Tr)
        token_rewards = shape_rewards(scores, kl.float(), self.h.kl_coef, mask)  # (B, Tr)
        A = reinforce_pp_returns(token_rewards, mask)  # (B, Tr), whitened over the batch's tokens
        kl_seq = (kl * s.mask).sum(dim=1)  # (B,)
        return A, {"kl_ref": kl_seq.mean().item(), "rlhf_reward": (token_rewards.sum(1)).mean().item()}
