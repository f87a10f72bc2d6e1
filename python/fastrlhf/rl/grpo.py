"""GRPO (Shao et al. 2024, arXiv 2402.03300) and its fixes on the shared online trainer: G answers per
prompt, each answer's advantage its reward against its group's (rl/advantages.py: group / batch / no std
scaling, Dr. GRPO arXiv 2503.20783), a clipped policy loss with DAPO's asymmetric clip (arXiv 2503.14476),
the token-mean, sequence-mean or Dr. GRPO aggregation, an optional k3 KL term to the reference (beta = 0
loads no reference), dynamic sampling (groups whose rewards all tie are dropped and refilled) and
overlong filtering (answers cut at max_new_tokens are masked out). No critic.

As PPO, the sampler's log-probs are the old log-probs: at the first minibatch of a step ratio == 1 up to
fp32 rounding, checked every step; a filtered sampling distribution (top-k/top-p) is refused."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fastrlhf import ops
from fastrlhf.config import INF, check_choice, check_range, to_dict
from fastrlhf.models import CausalLM
from fastrlhf.rl.advantages import SCALES, group_advantages, zero_variance_groups
from fastrlhf.rl.rollout import (
    RewardFn,
    Samples,
    masked_responses,
    response_hidden,
    response_logprobs,
    sample,
)
from fastrlhf.rl.trainer import OnlineTrainer
from fastrlhf.train.loop import LoopConfig
from fastrlhf.train.optim import OptimConfig, autocast_for, lr_at, make_adamw, set_lr

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
INVARIANT_TOL, TOKEN_TOL = 1e-5, 1e-3  # as PPO's (rl/ppo.py)


@dataclass
class GRPOHyperConfig:
    prompts_per_step: int = 8
    """Prompts sampled per step (each G times)."""
    group_size: int = 4
    """G: answers per prompt (>= 2: the baseline is the group)."""
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
    scale_rewards: str = "group"
    """'group' (GRPO), 'batch', or 'none' (Dr. GRPO)."""
    loss_agg: str = "token_mean"
    """'token_mean' (DAPO, the default), 'seq_mean_token_mean' (GRPO), 'seq_mean_token_sum_norm' (Dr. GRPO)."""
    beta: float = 0.0
    """Weight of the k3 KL to the reference in the loss; 0 = no KL and no reference model loaded."""
    dynamic_sampling: bool = False
    """Drop groups whose rewards all tie and sample new prompts in their place (up to max_refills times)."""
    max_refills: int = 3
    overlong_filter: bool = False
    """Mask out answers that hit max_new_tokens without their end token."""
    max_nonfinite: int = 3
    """Abort after this many non-finite steps in a row."""

    def __post_init__(self) -> None:
        w = "grpo."
        for name in ("prompts_per_step", "minibatch", "epochs", "max_new_tokens", "max_nonfinite"):
            check_range(w + name, getattr(self, name), 1, INF)
        check_range(w + "group_size", self.group_size, 2, INF)
        check_range(w + "max_refills", self.max_refills, 0, INF)
        if (self.prompts_per_step * self.group_size) % self.minibatch:
            raise ValueError(
                f"grpo.prompts_per_step * grpo.group_size ({self.prompts_per_step * self.group_size}) "
                f"must be a multiple of grpo.minibatch ({self.minibatch})"
            )
        check_range(w + "temperature", self.temperature, 0.0, INF, lo_open=True)
        check_range(w + "eps_low", self.eps_low, 0.0, 1.0, hi_open=True)
        check_range(w + "eps_high", self.eps_high, 0.0, INF, hi_open=True)
        if self.eps_high < self.eps_low:
            raise ValueError(f"grpo.eps_high ({self.eps_high}) must be >= grpo.eps_low ({self.eps_low})")
        check_range(w + "beta", self.beta, 0.0, INF, hi_open=True)
        check_choice(w + "scale_rewards", self.scale_rewards, SCALES)
        check_choice(w + "loss_agg", self.loss_agg, AGGREGATIONS)

    @property
    def batch(self) -> int:
        return self.prompts_per_step * self.group_size


@dataclass
class GRPOTrainConfig(LoopConfig):
    prompts: str = ""
    """A prompts file (one a line, or JSONL with "prompt"), or a task's name (its train prompts)."""
    reward: str = "task"
    """'task' (the task's exact scorer; train.prompts must then name the task) or a reward-model folder."""
    out_dir: str = "runs/grpo"
    max_steps: int = 100
    log_interval: int = 1
    ckpt_interval: int = 10
    seed: int = 1234

    def __post_init__(self) -> None:
        self.check_at_least_one()


@dataclass
class GRPOConfig:
    policy: str = ""
    """The model to train: a run or stage folder, an HF folder, a .gguf file or a known name."""
    grpo: GRPOHyperConfig = field(default_factory=GRPOHyperConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-5, min_lr=1e-6, warmup_steps=0, weight_decay=0.0)
    )
    train: GRPOTrainConfig = field(default_factory=GRPOTrainConfig)


def policy_loss(
    logprobs: Tensor,
    old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    g: GRPOHyperConfig,
    ref: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO's loss through the fused op (ops.policy_loss: the clipped surrogate with the asymmetric clip,
    the k3 KL term, the aggregation; one pass forward and backward); advantages (B,) per answer."""
    return ops.policy_loss(
        logprobs,
        old,
        advantages.to(logprobs.dtype),
        mask,
        eps_low=g.eps_low,
        eps_high=g.eps_high,
        agg=g.loss_agg,
        ref_logprobs=ref if g.beta > 0 else None,
        beta=g.beta,
        max_len=g.max_new_tokens if g.loss_agg == "seq_mean_token_sum_norm" else None,
    )


class GRPOTrainer(OnlineTrainer):
    """GRPO on `policy` (ref: the frozen reference, needed only when beta > 0) with reward_fn(prompts,
    responses) -> (B,) scores on token ids (a task's scorer, a reward model, several weighted: rl/build)."""

    desc = "grpo"

    def __init__(
        self,
        cfg: GRPOConfig,
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
        g = cfg.grpo
        super().__init__(
            cfg.train,
            policy,
            prompts,
            g.prompts_per_step,
            max_nonfinite=g.max_nonfinite,
            tokenizer=tokenizer,
            quiet=quiet,
        )
        if g.beta > 0 and ref is None:
            raise ValueError(f"grpo.beta = {g.beta} needs a reference model (beta = 0 needs none)")
        longest = max(map(len, self.prompts))
        if longest + g.max_new_tokens > policy.config.block_size:
            raise ValueError(
                f"the longest prompt ({longest} tokens) + grpo.max_new_tokens ({g.max_new_tokens}) "
                f"exceeds the policy's block_size ({policy.config.block_size})"
            )
        self.cfg, self.ref, self.reward_fn, self.eos, self.true_score = (
            cfg,
            ref,
            reward_fn,
            eos_token_id,
            true_score,
        )
        if ref is not None:
            ref.eval().requires_grad_(False)
        policy.eval()  # dropout would break ratio == 1 at the first minibatch
        self.optimizer = make_adamw(policy, cfg.optim)
        self.models = {"model": policy}
        self.refilled_total = 0

    def _rewards(self, prompts: list[list[int]], s: Samples) -> Tensor:
        scores = torch.as_tensor(self.reward_fn(prompts, masked_responses(s)), dtype=torch.float32)
        if scores.shape != (len(prompts),):
            raise ValueError(f"reward_fn must return {len(prompts)} scores; got shape {tuple(scores.shape)}")
        return scores

    @torch.no_grad()
    def collect(self) -> tuple[list[list[int]], Samples, Tensor, int, int]:
        """(prompts repeated G times, samples, rewards, groups dropped as ties, refills): with dynamic
        sampling, tied groups are dropped and new prompts sampled until the batch is full of signal."""
        g = self.cfg.grpo
        keep_p, keep_r, parts, dropped, refills = [], [], [], 0, 0
        while True:
            prompts = [p for p in self._next_prompts() for _ in range(g.group_size)]
            s = sample(
                self.policy,
                prompts,
                g.max_new_tokens,
                temperature=g.temperature,
                top_k=0,
                top_p=1.0,
                eos_token_id=self.eos,
                generator=self.gens["sample"],
            )
            r = self._rewards(prompts, s)
            if not g.dynamic_sampling:
                return prompts, s, r, 0, 0
            tied = zero_variance_groups(r, g.group_size)  # (n,)
            dropped += int(tied.sum())
            rows = (~tied).repeat_interleave(g.group_size)
            keep_p += [p for p, k in zip(prompts, rows.tolist()) if k]
            keep_r.append(r[rows])
            parts.append((s, rows))
            if len(keep_p) >= g.batch or refills >= g.max_refills:
                break
            refills += 1
        if not keep_p:  # every group tied: train on the last batch as it is (its advantages are all 0)
            return prompts, s, r, dropped, refills
        merged = _merge_samples(parts)  # the kept rows of every round, prompts re-padded together
        n = min(g.batch, len(keep_p)) // g.group_size * g.group_size
        return keep_p[:n], _take(merged, n), torch.cat(keep_r)[:n], dropped, refills

    def step(self) -> dict[str, float]:
        with autocast_for(self.device, self.t.dtype):
            return self._step()

    def _step(self) -> dict[str, float]:
        g, t0 = self.cfg.grpo, time.perf_counter()
        self.seed_step()
        prompts, s, rewards, dropped, refills = self.collect()
        t_gen = time.perf_counter()
        mask = s.mask
        if g.overlong_filter and self.eos is not None:
            ended = ((s.responses == self.eos) & mask).any(dim=1)  # (B,)
            mask = mask & ended[:, None]
        advantages = group_advantages(rewards, g.group_size, g.scale_rewards)  # (B,)
        with torch.no_grad():
            ref = response_logprobs(self.ref, s, g.temperature) if g.beta > 0 else None
        t_score = time.perf_counter()
        stats, why = (
            self.update_or_undo(lambda: self._update(s, mask, advantages, ref))
            if bool(torch.isfinite(rewards).all())
            else ({}, "non-finite rewards")
        )
        self.count_step(why)
        lengths = s.mask.sum(dim=1).float()
        m = {
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
            "zero_variance_frac": float(zero_variance_groups(rewards, g.group_size).float().mean()),
            "dropped_groups": dropped,
            "refills": refills,
            "response_length": lengths.mean().item(),
            "nonfinite_steps": self.guard.total,
        }
        if self.true_score is not None:
            m["true_score"] = float(
                torch.as_tensor(self.true_score(prompts, masked_responses(s)), dtype=torch.float32).mean()
            )
        keys = (
            "loss",
            "clipfrac_low",
            "clipfrac_high",
            "approx_kl",
            "ratio_mean",
            "ratio_max",
            "entropy",
            "grad_norm",
            "lr",
            "first_ratio_dev",
        )
        m.update({k: stats.get(k, math.nan) for k in keys})
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
        g, o = self.cfg.grpo, self.cfg.optim
        B = s.mask.shape[0]
        mb = min(g.minibatch, B)
        total_updates = self.t.max_steps * g.epochs * max(B // mb, 1)
        sums: dict[str, float] = {}
        n = 0
        for epoch in range(g.epochs):
            perm = torch.randperm(B, generator=self.gens["shuffle"])
            for k in range(0, B - mb + 1, mb):
                rows = perm[k : k + mb]
                h = response_hidden(self.policy, s, rows)  # (b, Tr, C)
                lp, ent = ops.token_logprobs(
                    self.policy.lm_head(h), s.responses[rows], temperature=g.temperature, return_entropy=True
                )  # (b, Tr) each
                loss, st = policy_loss(
                    lp, s.logprobs[rows], advantages[rows], mask[rows], g, None if ref is None else ref[rows]
                )
                if not math.isfinite(loss.item()):
                    self.optimizer.zero_grad(set_to_none=True)
                    return {}, f"non-finite loss at epoch {epoch}, minibatch {k // mb}"
                if epoch == 0 and k == 0:
                    live = s.mask[rows]
                    dev = (
                        float((torch.exp(lp.detach() - s.logprobs[rows]) - 1).abs()[live].max())
                        if bool(live.any())
                        else 0.0
                    )
                    sums["first_ratio_dev"] = dev
                    if abs(float(st["ratio_mean"]) - 1) > INVARIANT_TOL * 10 or dev > TOKEN_TOL:
                        raise RuntimeError(
                            f"GRPO invariant broken at step {self.step_count + 1}: max |ratio - 1| = "
                            f"{dev:.3g} at the first minibatch; the scorer does not reproduce the sampler"
                        )
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

    def show(self, m: dict[str, float]) -> tuple[int, dict[str, float]]:
        return int(m["response_length"] * self.cfg.grpo.batch), {
            "reward": m["reward_mean"],
            "kl": m["approx_kl"],
        }

    def extra_state(self) -> dict[str, Any]:
        return {}

    def train(self) -> list[dict[str, float]]:  # type: ignore[override]
        return super().train(to_dict(self.cfg))


def _take(s: Samples, n: int) -> Samples:
    return Samples(**{k: (v[:n] if isinstance(v, Tensor) else v) for k, v in s.fields().items()})


def _merge_samples(parts: list[tuple[Samples, Tensor]]) -> Samples:
    """The kept rows of several sampling rounds as one batch: prompts re-padded on the left and responses
    on the right to the longest of each (positions and segments follow, as generate lays them out)."""
    from fastrlhf.models import left_pad_layout

    rows = [(s, i) for s, keep in parts for i in keep.nonzero().squeeze(1).tolist()]
    Tp = max(s.Tp for s, _ in rows)
    Tr = max(s.responses.shape[1] for s, _ in rows)
    B = len(rows)
    seq = torch.zeros(B, Tp + Tr, dtype=torch.long)
    prompt_real = torch.zeros(B, Tp, dtype=torch.long)
    responses = torch.zeros(B, Tr, dtype=torch.long)
    mask = torch.zeros(B, Tr, dtype=torch.bool)
    logprobs = torch.zeros(B, Tr)
    for b, (s, i) in enumerate(rows):
        real = s.segment_ids[i, : s.Tp].bool()  # the prompt's real tokens
        p = s.sequences[i, : s.Tp][real]
        seq[b, Tp - len(p) : Tp] = p
        prompt_real[b, Tp - len(p) :] = 1
        r = s.responses.shape[1]
        responses[b, :r], mask[b, :r], logprobs[b, :r] = s.responses[i], s.mask[i], s.logprobs[i]
    seq[:, Tp:] = responses
    positions, segment_ids = left_pad_layout(
        torch.cat([prompt_real, torch.ones(B, Tr, dtype=torch.long)], dim=1)
    )
    return Samples(seq, positions, segment_ids, Tp, responses, mask, logprobs, None)
