"""Step 3 of the recipe: PPO with PPO-ptx (InstructGPT, arXiv 2203.02155 section 3.5; the reward shaping
and KL controller of Ziegler et al. 2019, arXiv 1909.08593).

    python -m fastrlhf ppo --config configs/ppo_arithmetic.toml [section.field=value ...]

One step = rollout (KV-cache sampling; the sampler's logprobs are the old logprobs) -> score (reference
logprobs, values, reward) -> rewards = score at the last token - kl_coef * KL per token -> GAE ->
ppo_epochs x minibatches of clipped PPO (+ ptx_coef * pretraining loss). The data flow is DESIGN.md's
"One PPO step, as data"; metrics go to log.jsonl, checkpoints resume bit-for-bit on CPU.

Under torchrun (docs/distributed.md) each of N ranks samples rollout_batch / N episodes from its share of
the prompts with its own sampling seed; reward and advantage whitening, the KL controller and the metrics
use the whole batch (all-reduced sums), and each update averages the gradients of minibatch / N episodes
per rank, weighted so that the loss is the global minibatch's token mean."""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fastrlhf import ops
from fastrlhf.config import to_dict
from fastrlhf.data import random_batch
from fastrlhf.models import CausalLM, ScalarHeadModel
from fastrlhf.models.lora import adapters_off, freeze_base
from fastrlhf.rl.config import PPOConfig
from fastrlhf.rl.kl import AdaptiveKLController, KLController, kl_penalty, shape_rewards
from fastrlhf.rl.ppo_inputs import ValueHead, check_ppo_inputs
from fastrlhf.rl.rollout import (
    RewardFn,
    Samples,
    function_scores,
    masked_responses,
    response_hidden,
    response_logprobs,
    reward_model_scores,
    sample,
)
from fastrlhf.rl.stats import explained_variance, global_masked_moments, masked_whiten
from fastrlhf.rl.trainer import OnlineTrainer
from fastrlhf.train import dist
from fastrlhf.train.optim import autocast_for, lr_at, make_adamw, set_lr

INVARIANT_TOL = 1e-5  # on mean(ratio) - 1 and approx_kl at the first minibatch (the bound)
TOKEN_TOL = (
    1e-3  # on each token's |ratio - 1| there: the KV-cache sampler and the full-sequence scorer sum in
)
# different orders, so fp32 leaves ~1e-5 per token; a real mismatch (dropout, temperature) is far larger


@dataclass(frozen=True)
class Rollout(Samples):
    """One PPO batch: the sampled episodes and what PPO computes from them, built once; (B, Tr) unless noted."""

    values: Tensor  # the critic's V(s_t), 0 outside the mask
    score: Tensor  # (B,) after the EOS penalty and clipping
    kl: Tensor  # per-token KL estimate, 0 outside the mask
    rewards: Tensor
    advantages: Tensor  # whitened
    returns: Tensor


class PPOTrainer(OnlineTrainer):
    """PPO on `policy` against a frozen `ref`, scored by a frozen reward model (a ScalarHeadModel) or a
    reward_fn. `step()` runs one rollout + update and returns its metrics; `train()` is the loop with
    logging and resumable checkpoints (rl/trainer.py)."""

    desc = "ppo"

    def __init__(
        self,
        cfg: PPOConfig,
        policy: CausalLM,
        ref: CausalLM | None,
        reward: ScalarHeadModel | RewardFn,
        prompts: Sequence[Sequence[int]],
        *,
        value_model: ScalarHeadModel | None = None,
        eos_token_id: int | None = None,
        tokenizer: Any = None,
        reward_tokenizer: Any = None,
        ptx_tokens: np.ndarray | None = None,
        quiet: bool = False,
        true_score: RewardFn | None = None,
    ):
        self.cfg, p = cfg, cfg.ppo
        super().__init__(
            cfg.train,
            policy,
            prompts,
            p.rollout_batch,
            max_nonfinite=p.max_nonfinite,
            tokenizer=tokenizer,
            quiet=quiet,
        )
        self.true_score = true_score  # e.g. a task's checker: logged to show reward hacking, never trained on
        check_ppo_inputs(
            cfg, policy, ref, reward, self.prompts, value_model, tokenizer, reward_tokenizer, ptx_tokens
        )
        self.ref, self.reward, self.eos, self.ptx_tokens = ref, reward, eos_token_id, ptx_tokens
        if p.value_model == "policy_head":
            if value_model is not None:
                raise ValueError("ppo.value_model = 'policy_head' takes no separate value model")
            self.value: nn.Module = ValueHead(policy.config.n_embd).to(self.device)
        elif value_model is not None:
            self.value = value_model
        else:  # own trunk: from the RM (a base it shares with the policy stays shared), or the policy's weights
            self.value = (
                copy.deepcopy(reward, {id(q): q for q in policy.parameters()})
                if isinstance(reward, nn.Module)
                else ScalarHeadModel.from_gpt(policy)
            )
        self.value.requires_grad_(True)  # a copy of an already-frozen RM must still train
        freeze_base(self.value)  # a LoRA critic: its adapters and head train, its base is frozen
        for frozen in (ref, reward):
            if isinstance(frozen, nn.Module):
                frozen.eval().requires_grad_(False)
        # eval mode everywhere: dropout would break ratio == 1 at the first minibatch
        self.trained = nn.ModuleDict({"policy": policy, "value": self.value}).eval()
        o = cfg.optim
        self.optimizer = make_adamw(
            [policy, self.value], o
        )  # groups: policy decay/no-decay, value decay/no-decay
        self.lr_scales = [1.0, 1.0] + [o.value_lr / o.lr if o.value_lr else 1.0] * 2
        self._call = dist.wrap_call(
            self.trained
        )  # call(fn, *args): fn's backward averages grads over the ranks
        self.kl_ctl = (
            AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon)
            if p.adaptive_kl
            else KLController(p.kl_coef)
        )
        self.models = {"model": policy, "value": self.value}
        self._first: tuple[Tensor, Tensor] | None = None  # set by _rollout_values, taken by _update

    # ---- rollout -------------------------------------------------------------------------------------
    def _values(self, ro: Samples, rows: Tensor | slice = slice(None), h: Tensor | None = None) -> Tensor:
        if isinstance(self.value, ValueHead):
            return self.value(h if h is not None else response_hidden(self.policy, ro, rows))  # (b, Tr)
        return self.value.head(response_hidden(self.value.trunk, ro, rows)).squeeze(-1)  # (b, Tr)

    def _rollout_values(self, ro: Samples) -> Tensor:
        """(B, Tr) values of the separate value model. In one process the first minibatch's rows run with
        gradients and the graph is kept (self._first): until the first optimizer step the update's forward
        over those rows would compute exactly this again (same weights, same rows), so _update reuses it.
        Epoch 0's minibatch order is therefore drawn here, from the same generator and in the same order."""
        if dist.active():  # under DDP a forward must go through the wrapped module: no reuse
            return self._values(ro)
        perm = torch.randperm(self.cfg.ppo.rollout_batch, generator=self.gens["shuffle"])  # (B,)
        first, rest = perm[: self.cfg.ppo.minibatch], perm[self.cfg.ppo.minibatch :]
        with torch.enable_grad():
            v_first = self._values(ro, first)  # (mb, Tr) with its graph
        values = torch.empty_like(ro.logprobs)  # (B, Tr)
        values[first] = v_first.detach()
        if len(rest):
            values[rest] = self._values(ro, rest)
        self._first = (perm, v_first)
        return values

    @torch.no_grad()
    def generate(self, prompts: list[list[int]]) -> Samples:
        p = self.cfg.ppo
        return sample(
            self.policy,
            prompts,
            p.max_new_tokens,
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            eos_token_id=self.eos,
            generator=self.gens["sample"],
            return_hidden=isinstance(self.value, ValueHead),  # the sampling pass's states give the values
        )

    @torch.no_grad()
    def rollout(self, s: Samples, prompts: list[list[int]]) -> Rollout:
        """Score sampled episodes: reference log-probs, values, the reward, KL-shaped rewards, GAE."""
        p, moments, mask = self.cfg.ppo, global_masked_moments, s.mask  # whitening over every rank's episodes
        if self.ref is not None:
            ref_logprobs = response_logprobs(self.ref, s, p.temperature)  # (B, Tr)
        else:  # LoRA: the reference is the policy's own base, the adapters off (no second copy)
            with adapters_off(self.policy):
                ref_logprobs = response_logprobs(self.policy, s, p.temperature)
        # policy_head: V(s_t) from the states that sampled the rollout (equal to a re-run of the policy
        # trunk up to fp32 rounding), so the trunk is not run a second time
        values = (self.value(s.hidden) if s.hidden is not None else self._rollout_values(s)) * mask
        if isinstance(self.reward, nn.Module):
            score = reward_model_scores(self.reward, s)
        else:
            score = function_scores(self.reward, prompts, s)
        if self.eos is not None and p.missing_eos_penalty > 0:
            ended = ((s.responses == self.eos) & mask).any(dim=1)  # (B,)
            score = torch.where(ended, score, score - p.missing_eos_penalty)
        if p.score_clip > 0:
            score = score.clamp(-p.score_clip, p.score_clip)
        kl = kl_penalty(s.logprobs, ref_logprobs, p.kl_estimator) * mask
        rewards = shape_rewards(score, kl, self.kl_ctl.value, mask)
        if p.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False, moments=moments)
        advantages, returns = ops.gae(rewards, values, mask, gamma=p.gamma, lam=p.lam)
        if p.whiten_advantages:
            advantages = masked_whiten(advantages, mask, moments=moments)
        return Rollout(
            **s.fields(),
            values=values,
            score=score,
            kl=kl,
            rewards=rewards,
            advantages=advantages,
            returns=returns,
        )

    # ---- update --------------------------------------------------------------------------------------
    def _minibatch_loss(
        self, ro: Rollout, mb: Tensor, values: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor], float]:
        """values: the rollout's own forward of these rows (first minibatch, see _rollout_values) or None."""
        p = self.cfg.ppo
        h = response_hidden(self.policy, ro, mb)  # (b, Tr, C)
        logprobs, entropy = ops.token_logprobs(
            self.policy.lm_head(h), ro.responses[mb], temperature=p.temperature, return_entropy=True
        )  # (b, Tr) each
        values = self._values(ro, mb, h) if values is None else values
        loss, stats = ops.ppo_loss(
            logprobs,
            ro.logprobs[mb],
            ro.advantages[mb],
            values,
            ro.values[mb],
            ro.returns[mb],
            ro.mask[mb],
            clip_range=p.clip_range,
            clip_range_value=p.clip_range_value,
            vf_coef=p.vf_coef,
            entropy=entropy,
            ent_coef=p.ent_coef,
        )
        if (
            dist.active()
        ):  # N * local tokens / global tokens: DDP's mean over ranks is then the global token mean
            n = ro.mask[mb].sum()
            share = float(n * dist.world_size() / dist.all_sum(n).clamp(min=1))
            loss = loss * share
            stats = {k: v if k == "ratio_max" else v * share for k, v in stats.items()}
        if p.ptx_coef > 0:  # PPO-ptx: InstructGPT eq. 2's gamma * E_pretrain[log pi(x)]
            x, y = random_batch(self.ptx_tokens, p.ptx_batch, p.ptx_block, self.gens["ptx"])
            ptx_loss = self.policy(x.to(self.device), y.to(self.device))[1]
            loss = loss + p.ptx_coef * ptx_loss
            stats["ptx_loss"] = ptx_loss.detach()
        with torch.no_grad():
            ratio = torch.exp(logprobs - ro.logprobs[mb])[ro.mask[mb]]  # (n,) the minibatch's response tokens
            deviation = (float((ratio - 1).abs().max()), float((ratio.mean() - 1).abs()))
        return loss, stats, deviation

    @staticmethod
    def _agree(
        loss: Tensor, deviation: tuple[float, float], approx_kl: float
    ) -> tuple[bool, float, float, float]:
        """(loss non-finite, max |ratio - 1|, |mean ratio - 1|, |approx_kl|), each the worst over the ranks:
        every rank must take the same branch after a minibatch (a rank that skipped a collective would hang
        the others)."""
        local = torch.tensor(
            [float(not math.isfinite(loss.item())), *deviation, abs(approx_kl)], dtype=torch.float64
        )
        bad, dev, mean_dev, akl = dist.all_max(local).tolist()
        return bool(bad), dev, mean_dev, akl

    def _update(self, ro: Rollout) -> tuple[dict[str, float], str]:
        """ppo_epochs x minibatches of clipped PPO; returns mean stats and '' or why it stopped (non-finite)."""
        p, o = self.cfg.ppo, self.cfg.optim
        sums: dict[str, float] = {}
        n, norms, params = 0, [], [q for q in self.trained.parameters() if q.requires_grad]
        total_updates = self.cfg.train.max_steps * p.ppo_epochs * p.n_minibatches
        B, mbs = (
            p.rollout_batch // dist.world_size(),
            p.minibatch // dist.world_size(),
        )  # this rank's episodes
        first, self._first = self._first, None  # (epoch 0's order, the first minibatch's values) or None
        for epoch in range(p.ppo_epochs):
            perm = first[0] if epoch == 0 and first else torch.randperm(B, generator=self.gens["shuffle"])
            for k in range(p.n_minibatches):
                reuse = first[1] if epoch == 0 and k == 0 and first else None
                loss, stats, deviation = self._call(
                    self._minibatch_loss, ro, perm[k * mbs : (k + 1) * mbs], reuse
                )
                bad, deviation, mean_dev, abs_kl = self._agree(loss, deviation, float(stats["approx_kl"]))
                if bad:
                    if dist.active():
                        loss.backward()  # completes DDP's reduction; the gradients are thrown away
                        self.optimizer.zero_grad(set_to_none=True)
                    return {}, f"non-finite loss at epoch {epoch}, minibatch {k}"
                if epoch == 0 and k == 0:
                    sums["first_ratio_dev"], sums["first_approx_kl"] = deviation, float(stats["approx_kl"])
                if (
                    p.check_invariants
                    and epoch == 0
                    and k == 0
                    and (max(mean_dev, abs_kl) > INVARIANT_TOL or deviation > TOKEN_TOL)
                ):
                    raise RuntimeError(
                        f"PPO invariant broken at step {self.step_count + 1}: at the first minibatch "
                        f"|mean ratio - 1| = {mean_dev:.3g} and |approx_kl| = {abs_kl:.3g} (both must "
                        f"be <= {INVARIANT_TOL}), max |ratio - 1| = {deviation:.3g} (must be <= "
                        f"{TOKEN_TOL}); the scorer does not reproduce the sampler"
                    )
                set_lr(self.optimizer, lr_at(self.updates, o, total_updates), self.lr_scales)
                loss.backward()
                norm = float(
                    torch.nn.utils.clip_grad_norm_(params, o.grad_clip if o.grad_clip > 0 else math.inf)
                )
                if not math.isfinite(norm):
                    self.optimizer.zero_grad(set_to_none=True)
                    return {}, f"non-finite gradient norm at epoch {epoch}, minibatch {k}"
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.updates += 1
                n, norms = n + 1, norms + [norm]
                for key, v in stats.items():
                    v = float(v)
                    sums[key] = max(sums.get(key, v), v) if key == "ratio_max" else sums.get(key, 0.0) + v
        once = ("ratio_max", "first_ratio_dev", "first_approx_kl")
        out = dist.mean_floats(
            {k: (v if k in once else v / n) for k, v in sums.items()}, maxed=("ratio_max",)
        )
        out["grad_norm"] = sum(norms) / n
        out["lr"] = self.optimizer.param_groups[0]["lr"]
        return out, ""

    def step(self) -> dict[str, float]:
        """One PPO step (sample, score, update), under train.dtype's autocast (a no-op on the CPU), so the
        sampler and the scorer compute alike; returns its metrics."""
        with autocast_for(self.device, self.cfg.train.dtype):
            return self._step()

    def _step(self) -> dict[str, float]:
        t0, p = time.perf_counter(), self.cfg.ppo
        self.seed_step()
        prompts = self._next_prompts()[dist.shard(p.rollout_batch)]
        samples = self.generate(prompts)
        t_gen = time.perf_counter()
        ro = self.rollout(samples, prompts)
        t_score = time.perf_counter()
        kl_coef, mask = self.kl_ctl.value, ro.mask
        seq_kl = ro.kl.sum(dim=1)  # (B,)
        non_score = (-kl_coef * ro.kl).sum(dim=1)  # (B,)
        m = {
            "score_mean": ro.score.mean().item(),
            "score_std": ro.score.std().item() if len(ro.score) > 1 else 0.0,
            "kl": seq_kl.mean().item(),
            "kl_coef": kl_coef,
            "non_score_reward": non_score.mean().item(),
            "rlhf_reward": (ro.score + non_score).mean().item(),
        }
        if self.true_score is not None:
            m["true_score"] = float(np.mean(self.true_score(prompts, masked_responses(ro))))
        finite = bool(torch.isfinite(ro.advantages).all())
        if dist.active():  # the ranks hold equal shares: means of their means are global means
            everyone = torch.ones_like(ro.score, dtype=torch.bool)
            m["score_std"] = float(global_masked_moments(ro.score, everyone)[1].sqrt())
            m = dist.mean_floats(m | {"finite": float(finite)})
            finite = m.pop("finite") == 1.0
        finite = finite and all(math.isfinite(v) for v in m.values())
        if self.step_count < p.value_warmup_steps:  # critic warm-up (after the check above): value loss alone
            ro = dataclasses.replace(ro, advantages=torch.zeros_like(ro.advantages))
        stats, why = (
            self.update_or_undo(lambda: self._update(ro))
            if finite
            else ({}, "non-finite score, KL or advantages in the rollout")
        )
        self._first = None  # a skipped update must not leave the rollout's graph behind
        t_train = time.perf_counter()
        self.count_step(why)
        if not why:
            self.kl_ctl.update(m["kl"], self.cfg.ppo.rollout_batch)
        lengths = mask.sum(dim=1).float()
        ended = (
            ((ro.responses == self.eos) & mask).any(dim=1).float() if self.eos is not None else lengths * 0
        )
        m.update(
            {
                k: stats.get(k, math.nan)
                for k in (
                    "pg_loss",
                    "v_loss",
                    "clipfrac",
                    "vf_clipfrac",
                    "approx_kl",
                    "ratio_mean",
                    "ratio_max",
                    "entropy",
                    "grad_norm",
                    "lr",
                    "first_ratio_dev",
                    "first_approx_kl",
                )
            }
        )
        if self.cfg.ppo.ptx_coef > 0:
            m["ptx_loss"] = stats.get("ptx_loss", math.nan)
        sizes = dist.mean_floats(
            {
                "response_length": lengths.mean().item(),
                "eos_frac": ended.mean().item(),
                "tokens": lengths.sum().item() * dist.world_size(),
            }
        )  # tokens of all ranks
        m.update(
            explained_variance=explained_variance(ro.values, ro.returns, mask, moments=global_masked_moments),
            response_length=sizes["response_length"],
            eos_frac=sizes["eos_frac"],
            nonfinite_steps=self.guard.total,
            time_generate=t_gen - t0,
            time_score=t_score - t_gen,
            time_train=t_train - t_score,
            tokens_per_s=sizes["tokens"] / max(t_train - t0, 1e-9),
        )
        return m

    # ---- what the shared trainer (rl/trainer.py) asks of an algorithm -------------------------------------
    def show(self, m: dict[str, float]) -> tuple[int, dict[str, float]]:
        shown = {"score": m["score_mean"], "kl": m["kl"], "ent": m["entropy"], "ev": m["explained_variance"]}
        return int(m["response_length"] * self.cfg.ppo.rollout_batch), shown

    def extra_state(self) -> dict[str, Any]:
        return {"kl_ctl": self.kl_ctl.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.kl_ctl.load_state_dict(state["kl_ctl"])

    def train(self) -> list[dict[str, float]]:  # type: ignore[override]
        """Run (or resume) to train.max_steps; returns the metrics of the steps this call ran."""
        return super().train(to_dict(self.cfg))
