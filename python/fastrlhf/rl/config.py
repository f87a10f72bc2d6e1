"""The PPO run config: [models] [ppo] [optim] [train] tables, each field checked once with an error
that names it and its allowed range."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastrlhf.config import INF, check_choice, check_range
from fastrlhf.models.lora import LoraConfig
from fastrlhf.train.loop import LoopConfig
from fastrlhf.train.optim import OptimConfig


@dataclass
class ModelsConfig:
    """Checkpoint or run folders (a run folder means its latest checkpoint)."""

    policy: str = ""
    """The SFT model: the policy starts here."""
    reward: str = ""
    """The reward model (a scalar-head checkpoint); frozen."""
    ref: str = ""
    """The frozen reference; empty = the policy's checkpoint."""
    value: str = ""
    """The value model's starting point (ppo.value_model = 'separate'); empty = the reward model's."""


@dataclass
class PPOHyperConfig:
    """PPO, its reward shaping and its rollouts."""

    rollout_batch: int = 16
    """Prompts (episodes) per PPO step."""
    minibatch: int = 8
    """Episodes per gradient step; rollout_batch must be a multiple of it."""
    ppo_epochs: int = 4
    """Passes over each rollout batch."""
    max_new_tokens: int = 32
    """Longest response sampled."""
    temperature: float = 0.7
    """Sampling temperature; the scorer uses the same one."""
    top_k: int = 0
    """Top-k filter when sampling (0 = off); needs allow_sampling_mismatch."""
    top_p: float = 1.0
    """Nucleus filter when sampling (1 = off); needs allow_sampling_mismatch."""
    allow_sampling_mismatch: bool = False
    """Allow top_k/top_p, under which the sampled distribution differs from the scored one."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    clip_range: float = 0.2
    """Policy ratio clip."""
    clip_range_value: float = 0.2
    """Value clip around the rollout's values."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    ent_coef: float = 0.0
    """Entropy bonus weight."""
    kl_coef: float = 0.05
    """KL penalty coefficient (the start value when adaptive)."""
    kl_estimator: str = "k1"
    """Per-token KL estimator in the reward: 'k1' (log-ratio) or 'k3'."""
    adaptive_kl: bool = False
    """Adapt kl_coef towards kl_target (Ziegler et al. 2019)."""
    kl_target: float = 6.0
    """Target sequence KL (nats) of the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon (episodes) of the adaptive controller."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the score of responses that end without EOS (0 = off)."""
    score_clip: float = 0.0
    """Clip scores to [-score_clip, score_clip] (0 = off)."""
    whiten_rewards: bool = False
    """Whiten per-token rewards over the batch (mean kept)."""
    whiten_advantages: bool = True
    """Whiten the advantages over the batch (the usual PPO choice). It rescales them to unit spread even when
    the critic already explains the rewards, which turns noise into full-size steps."""
    ptx_coef: float = 0.0
    """PPO-ptx: weight of the pretraining loss added to each update (0 = off)."""
    ptx_batch: int = 4
    """Pretraining sequences per update."""
    ptx_block: int = 64
    """Tokens per pretraining sequence."""
    value_model: str = "separate"
    """'separate' (own trunk, from the RM) or 'policy_head' (a value head on the policy trunk)."""
    value_warmup_steps: int = 0
    """First steps that train only the value function: their advantages are zeroed, so the policy gets no
    policy-gradient (an untrained critic's advantages are noise). With 'policy_head' the value loss still
    moves the shared trunk."""
    max_nonfinite: int = 3
    """Abort after this many non-finite steps in a row."""
    check_invariants: bool = True
    """Check ratio == 1 and approx_kl == 0 at each step's first minibatch."""

    def __post_init__(self) -> None:
        w = "ppo."
        for name in (
            "rollout_batch",
            "minibatch",
            "ppo_epochs",
            "max_new_tokens",
            "kl_horizon",
            "ptx_batch",
            "ptx_block",
            "max_nonfinite",
        ):
            check_range(w + name, getattr(self, name), 1, INF)
        if self.rollout_batch % self.minibatch:
            raise ValueError(
                f"ppo.rollout_batch ({self.rollout_batch}) must be a multiple of ppo.minibatch "
                f"({self.minibatch})"
            )
        check_range(w + "temperature", self.temperature, 0.0, INF, lo_open=True)
        check_range(w + "top_k", self.top_k, 0, INF)
        check_range(w + "value_warmup_steps", self.value_warmup_steps, 0, INF)
        check_range(w + "top_p", self.top_p, 0.0, 1.0, lo_open=True)
        check_range(w + "gamma", self.gamma, 0.0, 1.0)
        check_range(w + "lam", self.lam, 0.0, 1.0)
        check_range(w + "clip_range", self.clip_range, 0.0, 1.0, lo_open=True, hi_open=True)
        check_range(w + "clip_range_value", self.clip_range_value, 0.0, INF, lo_open=True)
        for name in ("vf_coef", "ent_coef", "kl_coef", "missing_eos_penalty", "score_clip", "ptx_coef"):
            check_range(w + name, getattr(self, name), 0.0, INF, hi_open=True)
        check_range(w + "kl_target", self.kl_target, 0.0, INF, lo_open=True, hi_open=True)
        check_choice(w + "kl_estimator", self.kl_estimator, ("k1", "k3"))
        check_choice(w + "value_model", self.value_model, ("separate", "policy_head"))
        if (self.top_k > 0 or self.top_p < 1.0) and not self.allow_sampling_mismatch:
            raise ValueError(
                f"ppo.top_k={self.top_k} / ppo.top_p={self.top_p} sample from a filtered distribution that differs "
                "from the one PPO scores (the old logprobs would be off-policy); use top_k=0 and top_p=1.0, or set "
                "ppo.allow_sampling_mismatch=true"
            )

    @property
    def n_minibatches(self) -> int:
        return self.rollout_batch // self.minibatch


@dataclass
class PPOOptimConfig(OptimConfig):
    """AdamW for the policy and value model together (one optimizer, one clip over both)."""

    lr: float = 1e-4
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float = 1e-5
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 10
    """Linear warmup from 0 over this many optimizer steps (minibatch updates)."""
    weight_decay: float = 0.0
    """Decoupled weight decay on matrices (PPO fine-tuning usually uses none)."""
    value_lr: float = 0.0
    """Peak learning rate of the value function (its warmup and decay follow lr's); 0 = lr. A sharp
    policy wants a small lr, and its critic, which must learn the reward's scale, then lags behind."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.value_lr < 0:
            raise ValueError(f"optim.value_lr must be >= 0 (0 = optim.lr); got {self.value_lr}")


@dataclass
class PPOTrainConfig(LoopConfig):
    """The loop: prompts, pretraining data, steps, logging, checkpoints (LoopConfig's fields besides)."""

    prompts: str = ""
    """A prompts file: one prompt a line ('\\n' inside a line stands for a newline), or JSONL with "prompt"."""
    chat: bool = True
    """Wrap each prompt in the Prompt:/Response: chat format."""
    ptx_data: str = ""
    """A token file (train.bin) of pretraining text for PPO-ptx; needed when ppo.ptx_coef > 0."""
    out_dir: str = "runs/ppo"
    """Checkpoints and log.jsonl go here; an existing run there is resumed."""
    max_steps: int = 100
    """PPO steps (rollout + update) in the whole run."""
    log_interval: int = 1
    """Log every this many steps."""
    ckpt_interval: int = 10
    """Checkpoint every this many steps (and at the end); 0 = only at the end."""
    seed: int = 1234
    """Seeds sampling, the prompt order, minibatch shuffles and pretraining batches."""

    def __post_init__(self) -> None:
        self.check_at_least_one()


@dataclass
class PPOConfig:
    models: ModelsConfig = field(default_factory=ModelsConfig)
    ppo: PPOHyperConfig = field(default_factory=PPOHyperConfig)
    optim: PPOOptimConfig = field(default_factory=PPOOptimConfig)
    train: PPOTrainConfig = field(default_factory=PPOTrainConfig)
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(r=0))
    """LoRA adapters on the policy (lora.r > 0): its base frozen and, unless models.ref is given, the reference
    is that base with the adapters switched off (no second copy of the weights)."""
