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
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fastrlhf import ops
from fastrlhf.config import to_dict
from fastrlhf.data import random_batch
from fastrlhf.io import checkpoint as ckpt
from fastrlhf.models import GPT, Generation, ScalarHeadModel, generate, last_token_index
from fastrlhf.models.transformer import load_checked
from fastrlhf.rl.config import PPOConfig
from fastrlhf.rl.kl import (
    AdaptiveKLController,
    KLController,
    explained_variance,
    global_masked_moments,
    kl_penalty,
    masked_whiten,
    shape_rewards,
)
from fastrlhf.train import dist
from fastrlhf.train.log import JSONLLogger, NullLogger, Progress, read_jsonl
from fastrlhf.train.optim import lr_at, make_adamw, set_lr

RewardFn = Callable[[list[list[int]], list[list[int]]], "Sequence[float] | Tensor"]
"""reward_fn(prompts, responses) -> (B,) scores; token-id lists, responses cut after EOS (EOS included)."""
INVARIANT_TOL = 1e-5  # on mean(ratio) - 1 and approx_kl at the first minibatch (the bound)
TOKEN_TOL = (
    1e-3  # on each token's |ratio - 1| there: the KV-cache sampler and the full-sequence scorer sum in
)
# different orders, so fp32 leaves ~1e-5 per token; a real mismatch (dropout, temperature) is far larger


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


@dataclass
class Rollout:
    """One batch of episodes, everything (B, Tr) unless noted; Tp = padded prompt length."""

    sequences: Tensor  # (B, Tp + Tr) left-padded prompt + response
    positions: Tensor  # (B, Tp + Tr)
    segment_ids: Tensor  # (B, Tp + Tr)
    Tp: int
    responses: Tensor
    mask: Tensor  # bool, response tokens up to and including EOS
    logprobs: Tensor  # the sampler's (old) logprobs
    values: Tensor
    score: Tensor  # (B,) after the EOS penalty and clipping
    kl: Tensor  # per-token KL estimate, 0 outside the mask
    rewards: Tensor
    advantages: Tensor  # whitened
    returns: Tensor


def masked_responses(ro: Rollout) -> list[list[int]]:
    """Each episode's response ids up to and including EOS (what a reward function or scorer reads)."""
    return [[t for t, k in zip(r, mk) if k] for r, mk in zip(ro.responses.tolist(), ro.mask.tolist())]


def response_hidden(gpt: GPT, ro: Rollout, rows: Tensor | slice = slice(None)) -> Tensor:
    """(b, Tr, C): the trunk's hidden state at the positions that predict each response token. Only the
    last Tr + 1 positions are read, so the last block skips the prompt's rows (GPT.hidden's tail)."""
    tail = ro.sequences.shape[1] - ro.Tp + 1  # positions Tp - 1 .. T - 1
    h = gpt.hidden(
        ro.sequences[rows], positions=ro.positions[rows], segment_ids=ro.segment_ids[rows], tail=tail
    )
    return h[:, :-1]  # (b, Tr, C)


def same_tokenizer(a: Any, b: Any) -> bool:
    probe = "Prompt: The quick brown fox, 12+34=46!\nResponse: é ü 😀 <|endoftext|>"
    return (a.kind, a.vocab_size, a.eot_id, a.encode(probe)) == (
        b.kind,
        b.vocab_size,
        b.eot_id,
        b.encode(probe),
    )


class PPOTrainer:
    """PPO on `policy` against a frozen `ref`, scored by a frozen reward model (a ScalarHeadModel) or a
    reward_fn. `step()` runs one rollout + update and returns its metrics; `train()` is the loop with
    logging and resumable checkpoints."""

    def __init__(
        self,
        cfg: PPOConfig,
        policy: GPT,
        ref: GPT,
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
        self.true_score = true_score  # e.g. a task's checker: logged to show reward hacking, never trained on
        self.prompts = [list(map(int, x)) for x in prompts]
        if not self.prompts:
            raise ValueError("prompts must hold at least one prompt; got none")
        longest = max(map(len, self.prompts))
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
        if ref.config != policy.config:
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
        self.device = next(policy.parameters()).device
        self.policy, self.ref, self.reward = policy, ref, reward
        self.eos, self.tokenizer, self.ptx_tokens, self.quiet = eos_token_id, tokenizer, ptx_tokens, quiet
        if p.value_model == "policy_head":
            if value_model is not None:
                raise ValueError("ppo.value_model = 'policy_head' takes no separate value model")
            self.value: nn.Module = ValueHead(policy.config.n_embd).to(self.device)
        elif value_model is not None:
            self.value = value_model
        else:  # own trunk: from the RM, or (with a reward_fn) from the policy's weights
            self.value = (
                copy.deepcopy(reward) if isinstance(reward, nn.Module) else ScalarHeadModel.from_gpt(policy)
            )
        self.value.requires_grad_(True)  # a copy of an already-frozen RM must still train
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
        seed = cfg.train.seed
        self.gens = {
            name: torch.Generator().manual_seed(seed + i)
            for i, name in enumerate(("sample", "shuffle", "ptx"))
        }
        self.step_count = self.prompts_seen = self.updates = 0
        self.nonfinite_total = self.nonfinite_in_a_row = 0
        self._perm_cache: tuple[int, list[int]] = (-1, [])
        self._first: tuple[Tensor, Tensor] | None = None  # set by _rollout_values, taken by _update

    # ---- rollout -------------------------------------------------------------------------------------
    def _next_prompts(self) -> list[list[int]]:
        """rollout_batch prompts in a fresh seeded permutation per pass over the pool (resumable by count)."""
        out, n = [], len(self.prompts)  # the global batch; step() keeps this rank's share
        for i in range(self.prompts_seen, self.prompts_seen + self.cfg.ppo.rollout_batch):
            epoch, j = divmod(i, n)
            if self._perm_cache[0] != epoch:
                g = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + epoch)
                self._perm_cache = (epoch, torch.randperm(n, generator=g).tolist())
            out.append(self.prompts[self._perm_cache[1][j]])
        self.prompts_seen += len(out)
        return out

    def _values(self, ro: Rollout, rows: Tensor | slice = slice(None), h: Tensor | None = None) -> Tensor:
        if isinstance(self.value, ValueHead):
            return self.value(h if h is not None else response_hidden(self.policy, ro, rows))  # (b, Tr)
        return self.value.head(response_hidden(self.value.trunk, ro, rows)).squeeze(-1)  # (b, Tr)

    def _scores(self, gen: Generation, ro: Rollout, prompts: list[list[int]]) -> Tensor:
        if isinstance(self.reward, nn.Module):  # ScalarHeadModel.score, with the trunk's last block run only
            T = ro.sequences.shape[1]  # from the earliest last token on (GPT.hidden's tail)
            index = ro.Tp + last_token_index(ro.mask)  # (B,) the last response token
            tail = T - int(index.min())
            h = self.reward.trunk.hidden(
                ro.sequences, positions=ro.positions, segment_ids=ro.segment_ids, tail=tail
            )
            values = self.reward.head(h).squeeze(-1)  # (B, tail): positions T - tail .. T - 1
            return values.gather(1, (index - (T - tail))[:, None]).squeeze(1).float()
        scores = torch.as_tensor(
            self.reward(prompts, masked_responses(ro)), dtype=torch.float32, device=self.device
        )
        if scores.shape != (len(prompts),):
            raise ValueError(f"reward_fn must return {len(prompts)} scores; got shape {tuple(scores.shape)}")
        return scores

    def _rollout_values(self, ro: Rollout) -> Tensor:
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
    def rollout(self, prompts: list[list[int]]) -> Rollout:
        p, moments = self.cfg.ppo, global_masked_moments  # whitening over every rank's episodes
        head_values = isinstance(self.value, ValueHead)  # then the sampling pass's states give the values
        gen = generate(
            self.policy,
            prompts,
            p.max_new_tokens,
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            eos_token_id=self.eos,
            generator=self.gens["sample"],
            return_hidden=head_values,
        )
        self._t_gen = time.perf_counter()
        positions, segment_ids = gen.layout()  # (B, Tp + Tr) each
        mask = gen.response_mask
        z = torch.zeros_like(gen.logprobs)
        ro = Rollout(
            gen.sequences,
            positions,
            segment_ids,
            gen.prompt_mask.shape[1],
            gen.responses,
            mask,
            gen.logprobs,
            z,
            z,
            z,
            z,
            z,
            z,
        )
        ref_logits = self.ref.lm_head(response_hidden(self.ref, ro))  # (B, Tr, V)
        ref_logprobs = ops.token_logprobs(ref_logits, ro.responses, temperature=p.temperature)  # (B, Tr)
        # policy_head: V(s_t) from the states that sampled the rollout (equal to a re-run of the policy
        # trunk up to fp32 rounding), so the trunk is not run a second time
        ro.values = (self.value(gen.hidden) if head_values else self._rollout_values(ro)) * mask
        score = self._scores(gen, ro, prompts)
        if self.eos is not None and p.missing_eos_penalty > 0:
            ended = ((ro.responses == self.eos) & mask).any(dim=1)  # (B,)
            score = torch.where(ended, score, score - p.missing_eos_penalty)
        if p.score_clip > 0:
            score = score.clamp(-p.score_clip, p.score_clip)
        ro.score = score
        ro.kl = kl_penalty(ro.logprobs, ref_logprobs, p.kl_estimator) * mask
        rewards = shape_rewards(score, ro.kl, self.kl_ctl.value, mask)
        ro.rewards = (
            masked_whiten(rewards, mask, shift_mean=False, moments=moments) if p.whiten_rewards else rewards
        )
        advantages, ro.returns = ops.gae(ro.rewards, ro.values, mask, gamma=p.gamma, lam=p.lam)
        ro.advantages = (
            masked_whiten(advantages, mask, moments=moments) if p.whiten_advantages else advantages
        )
        return ro

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
        """One PPO step (rollout, score, update); returns its metrics."""
        t0, p = time.perf_counter(), self.cfg.ppo
        if dist.active():  # a stream per rank and step: ranks sample differently, a resume repeats them
            for name in ("sample", "ptx"):
                self.gens[name].manual_seed(dist.stream_seed(self.cfg.train.seed, name, self.step_count))
        prompts = self._next_prompts()[dist.shard(p.rollout_batch)]
        ro = self.rollout(prompts)
        t_gen, t_score = self._t_gen, time.perf_counter()
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
        if (
            self.step_count < p.value_warmup_steps
        ):  # critic warm-up (after the check above): the value loss alone
            ro.advantages.zero_()
        stats, why = self._update(ro) if finite else ({}, "non-finite score, KL or advantages in the rollout")
        self._first = None  # a skipped update must not leave the rollout's graph behind
        t_train = time.perf_counter()
        self.step_count += 1
        if why:
            self.nonfinite_total, self.nonfinite_in_a_row = (
                self.nonfinite_total + 1,
                self.nonfinite_in_a_row + 1,
            )
            if self.nonfinite_in_a_row >= self.cfg.ppo.max_nonfinite:
                raise RuntimeError(
                    f"{self.nonfinite_in_a_row} non-finite PPO steps in a row (last, step "
                    f"{self.step_count}: {why}); aborting. Lower optim.lr, check the reward's "
                    f"scores, or raise ppo.max_nonfinite"
                )
        else:
            self.nonfinite_in_a_row = 0
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
            nonfinite_steps=self.nonfinite_total,
            time_generate=t_gen - t0,
            time_score=t_score - t_gen,
            time_train=t_train - t_score,
            tokens_per_s=sizes["tokens"] / max(t_train - t0, 1e-9),
        )
        return m

    # ---- checkpoints and the loop ----------------------------------------------------------------------
    def save(self, out_dir: str | Path) -> Path:
        state = {
            "config": {"model": self.policy.config.to_dict()},
            "ppo_config": to_dict(self.cfg),
            "trainer": {
                "step": self.step_count,
                "prompts_seen": self.prompts_seen,
                "updates": self.updates,
                "kl_ctl": self.kl_ctl.state_dict(),
                "nonfinite_total": self.nonfinite_total,
                "nonfinite_in_a_row": self.nonfinite_in_a_row,
            },
        }
        return dist.save_checkpoint(
            out_dir,
            self.step_count,
            models={"model": self.policy, "value": self.value},
            optimizers={"optim": self.optimizer},
            generators=self.gens,
            state=state,
            tokenizer=self.tokenizer,
            keep=self.cfg.train.keep_checkpoints,
        )

    def load(self, path: str | Path) -> None:
        """Restore everything save() wrote (weights, optimizer, RNGs, KL controller, data position)."""
        meta = ckpt.read_state(path)
        saved = meta["state"]["config"]["model"]
        if saved != self.policy.config.to_dict():
            raise ValueError(f"{path} holds a policy with config {saved}, not {self.policy.config.to_dict()}")
        meta = ckpt.load_checkpoint(
            path,
            models={"model": self.policy, "value": self.value},
            optimizers={"optim": self.optimizer},
            generators=self.gens,
        )
        t = meta["state"]["trainer"]
        self.step_count, self.prompts_seen, self.updates = t["step"], t["prompts_seen"], t["updates"]
        self.nonfinite_total, self.nonfinite_in_a_row = t["nonfinite_total"], t["nonfinite_in_a_row"]
        self.kl_ctl.load_state_dict(t["kl_ctl"])

    def train(self) -> list[dict[str, float]]:
        """Run (or resume) to train.max_steps; returns the metrics of the steps this call ran."""
        t = self.cfg.train
        out = Path(t.out_dir)
        latest = ckpt.latest_checkpoint(out)
        main = dist.is_main()  # rank 0 logs; every rank trains
        if latest is not None:
            self.load(latest)
            log = out / "log.jsonl"  # drop rows a killed run logged after its last checkpoint
            if main and log.is_file():
                rows = [r for r in read_jsonl(log) if r.get("step", 0) <= self.step_count]
                ckpt.atomic_write_text(log, "".join(json.dumps(r) + "\n" for r in rows))
        logger = JSONLLogger(out / "log.jsonl") if main else NullLogger()
        tb = _tensorboard(out) if t.tensorboard and main else None
        progress = Progress(
            t.max_steps,
            initial=self.step_count,
            desc="ppo",
            enabled=False if self.quiet or not main else None,
        )
        deadline = time.perf_counter() + t.max_minutes * 60 if t.max_minutes > 0 else math.inf
        history = []
        while self.step_count < t.max_steps:
            m = self.step()
            history.append(m)
            progress.update(
                int(m["response_length"] * self.cfg.ppo.rollout_batch),
                score=m["score_mean"],
                kl=m["kl"],
                ent=m["entropy"],
                ev=m["explained_variance"],
            )
            late = deadline < math.inf and dist.any_rank(
                time.perf_counter() > deadline
            )  # all ranks stop alike
            final = self.step_count == t.max_steps or late
            if self.step_count % t.log_interval == 0 or final:
                logger.log(step=self.step_count, **m)
                for k, v in m.items() if tb is not None else ():
                    tb.add_scalar(f"ppo/{k}", v, self.step_count)
            if (t.ckpt_interval and self.step_count % t.ckpt_interval == 0) or final:
                self.save(out)
            if final:
                break
        progress.close()
        logger.close()
        if tb is not None:
            tb.close()
        return history


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ValueError(
            "train.tensorboard = true needs the tensorboard package (pip install tensorboard)"
        ) from exc
    return SummaryWriter(str(out / "tb"))
