"""What PPO checks before it starts (models that fit together, prompts that fit the context, PPO-ptx's
data) and its value head on the policy's trunk (ppo.value_model = 'policy_head')."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor, nn

from fastrlhf.models import CausalLM
from fastrlhf.models.lora import lora_layers
from fastrlhf.models.transformer import load_checked
from fastrlhf.rl.config import PPOConfig
from fastrlhf.train import dist


class ValueHead(nn.Module):
    """A scalar head on the policy's trunk (ppo.value_model = 'policy_head'); starts at 0."""

    def __init__(self, n_embd: int):
        super().__init__()
        self.head = nn.Linear(n_embd, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, h: Tensor) -> Tensor:
        return self.head(h).squeeze(-1)  # (B, T, C) -> (B, T)

    def weights(self) -> dict[str, Tensor]:
        return dict(self.state_dict())

    def load_weights(self, tensors: dict[str, Tensor], source: str = "checkpoint") -> None:
        load_checked(self, tensors, source)


def same_tokenizer(a: Any, b: Any) -> bool:
    probe = "Prompt: The quick brown fox, 12+34=46!\nResponse: é ü 😀 <|endoftext|>"
    return (a.kind, a.vocab_size, a.eot_id, a.encode(probe)) == (
        b.kind,
        b.vocab_size,
        b.eot_id,
        b.encode(probe),
    )


def check_ppo_inputs(
    cfg: PPOConfig,
    policy: CausalLM,
    ref: CausalLM | None,
    reward: Any,
    prompts: list[list[int]],
    value_model: Any,
    tokenizer: Any,
    reward_tokenizer: Any,
    ptx_tokens: np.ndarray | None,
) -> None:
    """ValueError naming what does not fit, before any model moves."""
    p = cfg.ppo
    longest = max(map(len, prompts))
    if longest + p.max_new_tokens > policy.config.block_size:
        raise ValueError(
            f"the longest prompt ({longest} tokens) + ppo.max_new_tokens ({p.max_new_tokens}) "
            f"exceeds the policy's block_size ({policy.config.block_size})"
        )
    if ref is policy or (value_model is not None and value_model is reward):
        raise ValueError(
            "ref must be a copy of the policy, and value_model a copy of the reward model, not the "
            "same objects: the frozen ones must not move"
        )
    if ref is None:
        if not lora_layers(policy):
            raise ValueError(
                "ref is None: only a LoRA policy (lora.r > 0) has its reference built in (its base)"
            )
    elif ref.config != policy.config:
        raise ValueError(f"the reference's config {ref.config} differs from the policy's {policy.config}")
    if isinstance(reward, nn.Module):
        if reward.config.vocab_size != policy.config.vocab_size:
            raise ValueError(
                f"the reward model's vocab_size ({reward.config.vocab_size}) differs from the "
                f"policy's ({policy.config.vocab_size}): it reads another tokenizer's ids"
            )
        if (
            tokenizer is not None
            and reward_tokenizer is not None
            and not same_tokenizer(tokenizer, reward_tokenizer)
        ):
            raise ValueError(
                "the reward model's tokenizer differs from the policy's; a reward model must read "
                "the token ids the policy writes (train it on the same tokenizer)"
            )
    if p.ptx_coef > 0 and (ptx_tokens is None or len(ptx_tokens) <= p.ptx_block + 1):
        raise ValueError(
            f"ppo.ptx_coef = {p.ptx_coef} needs pretraining tokens longer than ppo.ptx_block "
            f"({p.ptx_block}); set train.ptx_data to a token file"
        )
    if p.ptx_coef > 0 and p.ptx_block > policy.config.block_size:
        raise ValueError(
            f"ppo.ptx_block ({p.ptx_block}) exceeds the policy's block_size "
            f"({policy.config.block_size}); set ppo.ptx_block <= {policy.config.block_size}"
        )
    dist.check_divides("ppo.rollout_batch", p.rollout_batch)
    dist.check_divides("ppo.minibatch", p.minibatch)
