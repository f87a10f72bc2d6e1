"""GRPO (Shao et al. 2024, arXiv 2402.03300) and its fixes on the critic-free trainer (rl/critic_free.py):
G answers per prompt, each answer's advantage its reward against its group's (rl/advantages.py: group /
batch / no std scaling, Dr. GRPO arXiv 2503.20783), DAPO's asymmetric clip, dynamic sampling and overlong
filtering (arXiv 2503.14476), and an optional k3 KL term to the reference in the loss (beta = 0 loads no
reference)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor

from fastrlhf.config import INF, check_choice, check_range
from fastrlhf.models.lora import LoraConfig
from fastrlhf.rl.advantages import SCALES, group_advantages
from fastrlhf.rl.critic_free import (
    CriticFreeHyperConfig,
    CriticFreeTrainConfig,
    CriticFreeTrainer,
    policy_loss,
)
from fastrlhf.rl.rollout import Samples
from fastrlhf.train.optim import OptimConfig


@dataclass
class GRPOHyperConfig(CriticFreeHyperConfig):
    SECTION: ClassVar[str] = "grpo"

    scale_rewards: str = "group"
    """'group' (GRPO), 'batch', or 'none' (Dr. GRPO)."""
    beta: float = 0.0
    """Weight of the k3 KL to the reference in the loss; 0 = no KL and no reference model loaded."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("grpo.beta", self.beta, 0.0, INF, hi_open=True)
        check_choice("grpo.scale_rewards", self.scale_rewards, SCALES)

    def kl_setting(self) -> tuple[str, float]:
        return "grpo.beta", self.beta


@dataclass
class GRPOTrainConfig(CriticFreeTrainConfig):
    out_dir: str = "runs/grpo"


def _optim() -> OptimConfig:
    return OptimConfig(lr=1e-5, min_lr=1e-6, warmup_steps=0, weight_decay=0.0)


@dataclass
class GRPOConfig:
    policy: str = ""
    """The model to train: a run or stage folder, an HF folder, a .gguf file or a known name."""
    grpo: GRPOHyperConfig = field(default_factory=GRPOHyperConfig)
    optim: OptimConfig = field(default_factory=_optim)
    train: GRPOTrainConfig = field(default_factory=GRPOTrainConfig)
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(r=0))
    """LoRA adapters on the policy (lora.r > 0): the base frozen, and the reference is the base itself with the
    adapters switched off (no second copy in memory)."""

    @property
    def hyper(self) -> GRPOHyperConfig:
        return self.grpo


def grpo_loss(
    logprobs: Tensor,
    old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    g: GRPOHyperConfig,
    ref: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO's loss: the clipped surrogate plus beta * k3(ref) per token, aggregated as g.loss_agg."""
    return policy_loss(logprobs, old, advantages, mask, g, ref, g.beta)


class GRPOTrainer(CriticFreeTrainer):
    """GRPO on `policy` (ref: the frozen reference, needed only when beta > 0)."""

    desc = "grpo"
    h: GRPOHyperConfig

    def advantages(
        self, scores: Tensor, s: Samples, mask: Tensor, ref: Tensor | None
    ) -> tuple[Tensor, dict[str, float]]:
        return group_advantages(scores, self.h.group_size, self.h.scale_rewards), {}  # (B,)

    def loss(
        self, lp: Tensor, old: Tensor, adv: Tensor, mask: Tensor, ref: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        return grpo_loss(lp, old, adv, mask, self.h, ref)
