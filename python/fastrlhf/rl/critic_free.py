"""The critic-free online algorithms' shared trainer (GRPO, RLOO, REINFORCE++): sample several answers per
prompt (groups of consecutive rows), score them, turn the scores into advantages (the one thing an algorithm
defines, with its KL handling), and take clipped policy-gradient steps through the fused ops.policy_loss.
No critic. The per-algorithm pieces live in rl/grpo.py, rl/rloo.py and rl/reinforce_pp.py.

As PPO, the sampler's log-probs are the old log-probs: at the first minibatch of a step ratio == 1 up to
fp32 rounding, checked every step; a filtered sampling distribution (top-k/top-p) is never used."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from fastrlhf import ops
from fastrlhf.config import INF, check_choice, check_range, to_dict
from fastrlhf.models import CausalLM
from fastrlhf.models.lora import adapters_off, lora_layers
from fastrlhf.rl.advantages import check_groups, zero_variance_groups
from fastrlhf.rl.rewards import NonFiniteReward, check_scores, parse_reward
from fastrlhf.rl.rollout import (
    RewardFn,
    Samples,
    group_response_hidden,
    masked_responses,
    merge_samples,
    response_hidden,
    response_logprobs,
    sample,
    take_samples,
)
from fastrlhf.rl.trainer import OnlineTrainer
from fastrlhf.train.loop import LoopConfig
from fastrlhf.train.optim import autocast_for, lr_at, make_adamw, set_lr

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
INVARIANT_TOL, TOKEN_TOL = 1e-5, 1e-3  # as PPO's (rl/ppo.py)
LOGGED = ("loss", "pg_loss", "kl", "clipfrac_low", "clipfrac_high", "approx_kl", "ratio_mean", "ratio_max")
LOGGED += ("entropy", "grad_norm", "lr", "first_ratio_dev")


@dataclass
class CriticFreeHyperConfig:
    """The settings every critic-free algorithm shares; a subclass names its TOML section in SECTION."""

    SECTION: ClassVar[str] = "critic_free"
    MIN_GROUP: ClassVar[int] = 2  # the group is the baseline (GRPO, RLOO); REINFORCE++ needs none

    prompts_per_step: int = 8
    """Prompts sampled per step (each group_size times)."""
    group_size: int = 4
    """Answers per prompt (GRPO's G, RLOO's k), consecutive rows of the batch."""
    minibatch: int = 16
    """Answers per update; prompts_per_step * group_size must be a multiple of it."""
    epochs: int = 1
    """Passes over each step's answers."""
    max_new_tokens: int = 16
    temperature: float = 1.0
    eps_low: float = 0.2
    """The ratio's lower clip: 1 - eps_low."""
    eps_high: float = 0.2
    """The ratio's upper clip: 1 + eps_high (DAPO's clip-higher: 0.28)."""
    loss_agg: str = "token_mean"
    """'token_mean' (DAPO, the default), 'seq_mean_token_mean' (GRPO), 'seq_mean_token_sum_norm' (Dr. GRPO)."""
    dynamic_sampling: bool = False
    """Drop groups whose rewards all tie and sample new prompts in their place (up to max_refills times)."""
    max_refills: int = 3
    overlong_filter: bool = False
    """Mask out answers that hit max_new_tokens without their end token."""
    max_nonfinite: int = 3
    """Abort after this many skipped (non-finite) steps in a row."""

    def __post_init__(self) -> None:
        w = self.SECTION + "."
        for name in ("prompts_per_step", "minibatch", "epochs", "max_new_tokens", "max_nonfinite"):
            check_range(w + name, getattr(self, name), 1, INF)
        check_range(w + "group_size", self.group_size, self.MIN_GROUP, INF)
        check_range(w + "max_refills", self.max_refills, 0, INF)
        if self.batch % self.minibatch:
            raise ValueError(
                f"{w}prompts_per_step * {w}group_size ({self.batch}) must be a multiple of {w}minibatch "
                f"({self.minibatch})"
            )
        if self.dynamic_sampling and self.group_size < 2:
            raise ValueError(f"{w}dynamic_sampling needs {w}group_size >= 2 (ties within a group); got 1")
        check_range(w + "temperature", self.temperature, 0.0, INF, lo_open=True)
        check_range(w + "eps_low", self.eps_low, 0.0, 1.0, hi_open=True)
        check_range(w + "eps_high", self.eps_high, 0.0, INF, hi_open=True)
        if self.eps_high < self.eps_low:
            raise ValueError(f"{w}eps_high ({self.eps_high}) must be >= {w}eps_low ({self.eps_low})")
        check_choice(w + "loss_agg", self.loss_agg, AGGREGATIONS)

    @property
    def batch(self) -> int:
        return self.prompts_per_step * self.group_size

    def kl_setting(self) -> tuple[str, float]:
        """(name, value) of the weight of the KL to the reference (in the reward or the loss); > 0 needs
        the reference's log-probs, 0 loads no reference."""
        raise NotImplementedError

    def uses_ref(self) -> bool:
        return self.kl_setting()[1] > 0


@dataclass
class CriticFreeTrainConfig(LoopConfig):
    prompts: str = ""
    """A prompts file (one a line, or JSONL with "prompt"), or a task's name (its train prompts)."""
    reward: str = "task"
    """'task' (the task's exact scorer; train.prompts must name the task), a reward-model folder, or
    'module:function' (fn(prompts, responses) -> scores, on text); several weighted with ' + ', e.g.
    'task + 0.5 * runs/arith/rm' (rl/rewards.py)."""
    out_dir: str = "runs/critic_free"
    max_steps: int = 100
    log_interval: int = 1
    ckpt_interval: int = 10
    seed: int = 1234

    def __post_init__(self) -> None:
        self.check_at_least_one()
        parse_reward(self.reward)  # malformed: refused before anything is loaded


class CriticFreeTrainer(OnlineTrainer):
    """A critic-free algorithm on `policy` with reward_fn(prompts, responses) -> (B,) scores on token ids
    (rl/rewards.py builds one from a task, a reward model, a Python function or several weighted). ref: the
    frozen reference, needed only when the KL weight is > 0. Subclasses define advantages() (and GRPO loss())."""

    def __init__(
        self,
        cfg: Any,
        policy: CausalLM,
        reward_fn: RewardFn,
        prompts: Sequence[Sequence[int]],
        *,
        ref: CausalLM | None = None,
        eos_token_id: int | None = None,
        tokenizer: Any = None,
        quiet: bool = False,
        true_score: RewardFn | None = None,
    ):
        h = cfg.hyper
        super().__init__(
            cfg.train,
            policy,
            prompts,
            h.prompts_per_step,
            max_nonfinite=h.max_nonfinite,
            tokenizer=tokenizer,
            quiet=quiet,
        )
        self.cfg, self.h, self.ref, self.reward_fn = cfg, h, ref, reward_fn
        self.eos, self.true_score = eos_token_id, true_score
        if h.uses_ref() and ref is None and not lora_layers(policy):
            name, value = h.kl_setting()
            raise ValueError(f"{name} = {value} needs a reference model ({name} = 0 needs none); pass ref")
        longest = max(map(len, self.prompts))
        if longest + h.max_new_tokens > policy.config.block_size:
            raise ValueError(
                f"the longest prompt ({longest} tokens) + {h.SECTION}.max_new_tokens ({h.max_new_tokens}) "
                f"exceeds the policy's block_size ({policy.config.block_size})"
            )
        if ref is not None:
            ref.eval().requires_grad_(False)
        policy.eval()  # dropout would break ratio == 1 at the first minibatch
        self.optimizer = make_adamw(policy, cfg.optim)
        self.models = {"model": policy}

    # ---- what an algorithm defines -------------------------------------------------------------------
    def advantages(
        self, scores: Tensor, s: Samples, mask: Tensor, ref: Tensor | None
    ) -> tuple[Tensor, dict[str, float]]:
        """(advantages (B,) per answer or (B, Tr) per token, extra metrics) from the scores (B,)."""
        raise NotImplementedError

    def loss(
        self, lp: Tensor, old: Tensor, adv: Tensor, mask: Tensor, ref: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The clipped surrogate through the fused op; GRPO adds its k3 term."""
        return policy_loss(lp, old, adv, mask, self.h)

    # ---- the step ---------------------------------------------------------------------------------------
    def _rewards(self, prompts: list[list[int]], s: Samples) -> Tensor:
        return check_scores("reward_fn", self.reward_fn(prompts, masked_responses(s)), len(prompts))

    @torch.no_grad()
    def collect(self) -> tuple[list[list[int]], Samples, Tensor, int, int]:
        """(prompts repeated group_size times, samples, rewards, groups dropped as ties, refills): with
        dynamic sampling, tied groups are dropped and new prompts sampled until the batch is full of signal."""
        h = self.h
        keep_p, keep_r, parts, dropped, refills = [], [], [], 0, 0
        while True:
            prompts = [p for p in self._next_prompts() for _ in range(h.group_size)]
            s = sample(
                self.policy,
                prompts,
                h.max_new_tokens,
                temperature=h.temperature,
                top_k=0,
                top_p=1.0,
                eos_token_id=self.eos,
                generator=self.gens["sample"],
            )
            r = self._rewards(prompts, s)
            if not h.dynamic_sampling:
                return prompts, s, r, 0, 0
            tied = zero_variance_groups(r, h.group_size)  # (n,)
            dropped += int(tied.sum())
            rows = (~tied).repeat_interleave(h.group_size)
            keep_p += [p for p, k in zip(prompts, rows.tolist()) if k]
            keep_r.append(r[rows])
            parts.append((s, rows))
            if len(keep_p) >= h.batch or refills >= h.max_refills:
                break
            refills += 1
        if not keep_p:  # every group tied: train on the last batch as it is (its advantages are all 0)
            return prompts, s, r, dropped, refills
        merged = merge_samples(parts)  # the kept rows of every round, prompts re-padded together
        n = min(h.batch, len(keep_p)) // h.group_size * h.group_size
        return keep_p[:n], take_samples(merged, n), torch.cat(keep_r)[:n], dropped, refills

    def ref_logprobs(self, s: Samples) -> Tensor:
        """(B, Tr) the reference's log-probs of the answers: its own model's, or with LoRA the policy's base
        (the adapters switched off)."""
        if self.ref is not None:
            return response_logprobs(self.ref, s, self.h.temperature)
        with adapters_off(self.policy):
            return response_logprobs(self.policy, s, self.h.temperature)

    def step(self) -> dict[str, float]:
        with autocast_for(self.device, self.t.dtype):
            return self._step()

    def _step(self) -> dict[str, float]:
        h, t0 = self.h, time.perf_counter()
        self.seed_step()
        try:
            prompts, s, rewards, dropped, refills = self.collect()
        except NonFiniteReward as exc:  # named by its source; the step is skipped and counted
            self.count_step(str(exc))
            return {"nonfinite_steps": self.guard.total, **{k: math.nan for k in LOGGED}}
        check_groups(prompts, h.group_size)
        rewards = rewards.to(s.logprobs.device)  # (B,) the scores come back on the CPU
        t_gen = time.perf_counter()
        mask = s.mask
        if h.overlong_filter and self.eos is not None:
            ended = ((s.responses == self.eos) & mask).any(dim=1)  # (B,)
            mask = mask & ended[:, None]
        with torch.no_grad():
            ref = self.ref_logprobs(s) if h.uses_ref() else None  # (B, Tr)
        advantages, extra = self.advantages(rewards, s, mask, ref)
        t_score = time.perf_counter()
        stats, why = self.update_or_undo(lambda: self._update(s, mask, advantages, ref))
        self.count_step(why)
        lengths = s.mask.sum(dim=1).float()
        m = {
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
            "zero_variance_frac": (
                float(zero_variance_groups(rewards, h.group_size).float().mean())
                if h.group_size > 1
                else math.nan
            ),
            "dropped_groups": dropped,
            "refills": refills,
            "response_length": lengths.mean().item(),
            "nonfinite_steps": self.guard.total,
            **extra,
        }
        if self.true_score is not None:
            m["true_score"] = float(
                torch.as_tensor(self.true_score(prompts, masked_responses(s)), dtype=torch.float32).mean()
            )
        m.update({k: stats.get(k, math.nan) for k in LOGGED})
        t_train = time.perf_counter()
        m.update(
            time_generate=t_gen - t0,
            time_score=t_score - t_gen,
            time_train=t_train - t_score,
            tokens_per_s=lengths.sum().item() / max(t_train - t0, 1e-9),
        )
        return m

    def _update(
        self, s: Samples, mask: Tensor, advantages: Tensor, ref: Tensor | None
    ) -> tuple[dict[str, float], str]:
        h, o = self.h, self.cfg.optim
        B = s.mask.shape[0]
        mb = min(h.minibatch, B)
        total_updates = self.t.max_steps * h.epochs * max(B // mb, 1)
        sums: dict[str, float] = {}
        n = 0
        G = h.group_size
        whole = G > 1 and mb % G == 0  # minibatches of whole groups: each prompt runs once in the update
        for epoch in range(h.epochs):
            if whole:  # the groups shuffled, each group's rows kept together
                perm = (
                    torch.randperm(B // G, generator=self.gens["shuffle"])[:, None] * G + torch.arange(G)
                ).view(-1)
            else:
                perm = torch.randperm(B, generator=self.gens["shuffle"])
            for k in range(0, B - mb + 1, mb):
                rows = perm[k : k + mb]
                hid = (
                    group_response_hidden(self.policy, s, rows, G)
                    if whole
                    else response_hidden(self.policy, s, rows)
                )  # (b, Tr, C)
                lp, ent = ops.token_logprobs(
                    self.policy.lm_head(hid),
                    s.responses[rows],
                    temperature=h.temperature,
                    return_entropy=True,
                )  # (b, Tr) each
                loss, st = self.loss(
                    lp, s.logprobs[rows], advantages[rows], mask[rows], None if ref is None else ref[rows]
                )
                if not math.isfinite(loss.item()):
                    self.optimizer.zero_grad(set_to_none=True)
                    return {}, f"non-finite loss at epoch {epoch}, minibatch {k // mb}"
                if epoch == 0 and k == 0:
                    sums["first_ratio_dev"] = self._check_invariant(lp.detach(), s, rows, st)
                set_lr(self.optimizer, lr_at(self.updates, o, total_updates))
                loss.backward()
                norm = float(
                    torch.nn.utils.clip_grad_norm_(
                        self.policy.parameters(), o.grad_clip if o.grad_clip > 0 else math.inf
                    )
                )
                if not math.isfinite(norm):
                    self.optimizer.zero_grad(set_to_none=True)
                    return {}, f"non-finite gradient norm at epoch {epoch}, minibatch {k // mb}"
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.updates += 1
                n += 1
                m = mask[rows].to(ent.dtype)
                for key, v in {
                    **st,
                    "loss": loss.detach(),
                    "grad_norm": norm,
                    "entropy": (ent.detach() * m).sum() / m.sum().clamp(min=1),
                }.items():
                    sums[key] = sums.get(key, 0.0) + float(v)
        out = {k: (v if k == "first_ratio_dev" else v / max(n, 1)) for k, v in sums.items()}
        out["lr"] = self.optimizer.param_groups[0]["lr"]
        return out, ""

    def _check_invariant(self, lp: Tensor, s: Samples, rows: Tensor, st: dict[str, Tensor]) -> float:
        """max |ratio - 1| over the first minibatch's tokens; raises when the scorer does not reproduce the
        sampler (mean ratio off by > 1e-4 or a token's ratio off by > 1e-3)."""
        live = s.mask[rows]
        dev = float((torch.exp(lp - s.logprobs[rows]) - 1).abs()[live].max()) if bool(live.any()) else 0.0
        if abs(float(st["ratio_mean"]) - 1) > INVARIANT_TOL * 10 or dev > TOKEN_TOL:
            raise RuntimeError(
                f"{self.desc.upper()} invariant broken at step {self.step_count + 1}: max |ratio - 1| = "
                f"{dev:.3g} at the first minibatch; the scorer does not reproduce the sampler"
            )
        return dev

    def show(self, m: dict[str, float]) -> tuple[int, dict[str, float]]:
        n = m.get("response_length", 0.0)
        return int(n * self.h.batch) if math.isfinite(n) else 0, {
            "reward": m.get("reward_mean", math.nan),
            "kl": m["approx_kl"],
        }

    def train(self) -> list[dict[str, float]]:  # type: ignore[override]
        return super().train(to_dict(self.cfg))


def policy_loss(
    logprobs: Tensor,
    old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    h: CriticFreeHyperConfig,
    ref: Tensor | None = None,
    beta: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped policy loss through the fused op (ops.policy_loss: the asymmetric clip, the optional k3
    KL term with weight beta, the aggregation; one pass forward and backward); advantages (B,) or (B, T)."""
    return ops.policy_loss(
        logprobs,
        old,
        advantages.to(logprobs.dtype),
        mask,
        eps_low=h.eps_low,
        eps_high=h.eps_high,
        agg=h.loss_agg,
        ref_logprobs=ref if beta > 0 else None,
        beta=beta,
        max_len=h.max_new_tokens if h.loss_agg == "seq_mean_token_sum_norm" else None,
    )
