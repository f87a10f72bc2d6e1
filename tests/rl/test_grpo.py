"""GRPO: the policy loss against its formulas (float64, every aggregation, asymmetric clip, the k3 term),
a tiny run that learns a rule, resume that repeats an uninterrupted run, dynamic sampling, bad input."""

from __future__ import annotations

import pytest
import torch
from fastrlhf.config import load_config
from fastrlhf.models import GPT, GPTConfig
from fastrlhf.rl.grpo import GRPOConfig, GRPOHyperConfig, GRPOTrainer, grpo_loss

CFG = GPTConfig(vocab_size=20, block_size=32, n_layer=1, n_head=2, n_embd=16)
EOS = 19


def loss_by_hand(lp, old, A, mask, g, ref=None):
    B, T = lp.shape
    per = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            r = torch.exp(lp[b, t] - old[b, t])
            c = min(max(r, 1 - g.eps_low), 1 + g.eps_high)
            per[b, t] = -min(r * A[b], c * A[b])
            if g.beta > 0:
                d = ref[b, t] - lp[b, t]
                per[b, t] += g.beta * (torch.exp(d) - d - 1)
    m = mask.double()
    if g.loss_agg == "token_mean":
        return (per * m).sum() / m.sum()
    rows = [b for b in range(B) if m[b].sum() > 0]  # the per-answer means count answers with a token
    if g.loss_agg == "seq_mean_token_mean":
        return torch.stack([(per[b] * m[b]).sum() / m[b].sum() for b in rows]).mean()
    return torch.stack([(per[b] * m[b]).sum() / g.max_new_tokens for b in rows]).mean()


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize(("eps_high", "beta"), [(0.2, 0.0), (0.28, 0.04)])
def test_policy_loss_equals_its_formula_in_float64(agg, eps_high, beta):
    torch.manual_seed(0)
    g = GRPOHyperConfig(
        loss_agg=agg,
        eps_high=eps_high,
        beta=beta,
        max_new_tokens=7,
        prompts_per_step=2,
        group_size=2,
        minibatch=4,
    )
    lp = (torch.randn(4, 7, dtype=torch.float64) * 0.3).requires_grad_()
    old, ref = (
        lp.detach() + torch.randn(4, 7, dtype=torch.float64) * 0.3,
        torch.randn(4, 7, dtype=torch.float64),
    )
    A = torch.tensor([1.0, -0.5, 0.0, 2.0], dtype=torch.float64)
    mask = torch.rand(4, 7) > 0.3
    mask[2] = False  # an all-masked answer
    mask[0, 0] = True
    got, stats = grpo_loss(lp, old, A, mask, g, ref)
    want = loss_by_hand(lp.detach(), old, A, mask, g, ref)
    torch.testing.assert_close(got.detach(), want)
    got.backward()
    assert torch.isfinite(lp.grad).all() and (lp.grad[~mask] == 0).all()
    assert 0 <= float(stats["clipfrac_low"]) <= 1 and 0 <= float(stats["clipfrac_high"]) <= 1


def count_fives(prompts, responses):
    return [float(sum(t == 5 for t in r)) for r in responses]


def trainer(tmp_path, *overrides, reward=count_fives, seed=0):
    cfg = load_config(
        GRPOConfig,
        None,
        [
            f"train.out_dir={tmp_path}",
            "grpo.prompts_per_step=4",
            "grpo.group_size=4",
            "grpo.minibatch=8",
            "grpo.max_new_tokens=6",
            "optim.lr=3e-3",
            "optim.warmup_steps=0",
            "train.max_steps=6",
            "train.ckpt_interval=2",
            "train.device=cpu",
            *overrides,
        ],
    )
    torch.manual_seed(seed)
    prompts = [[1, 2, 3], [4, 6], [7, 8, 9, 10], [11]]
    return GRPOTrainer(cfg, GPT(CFG), reward, prompts, eos_token_id=EOS, quiet=True)


def test_grpo_learns_a_rule_with_the_invariant_holding(tmp_path):
    tr = trainer(tmp_path, "train.max_steps=25", "grpo.epochs=2")
    before = {k: v.clone() for k, v in tr.policy.state_dict().items()}
    history = tr.train()
    assert all(m["first_ratio_dev"] < 1e-3 for m in history)
    first, last = history[0]["reward_mean"], sum(m["reward_mean"] for m in history[-5:]) / 5
    assert last > first + 0.5, f"mean reward {first:.2f} -> {last:.2f}"
    assert any(not torch.equal(v, tr.policy.state_dict()[k]) for k, v in before.items())


def test_resume_repeats_the_uninterrupted_run(tmp_path):
    full = trainer(tmp_path / "full")
    full.train()
    half = trainer(tmp_path / "half")  # stopped after 4 of 6 steps, with the checkpoint the loop writes there
    for _ in range(4):
        half.step()
    half.save(tmp_path / "half", {})
    again = trainer(tmp_path / "half")  # picks up the step-4 checkpoint, runs to 6
    again.train()
    for k, v in full.policy.state_dict().items():
        assert torch.equal(v, again.policy.state_dict()[k]), k


def test_dynamic_sampling_drops_and_refills_tied_groups(tmp_path):
    def tie_on_short_prompts(prompts, responses):
        return [0.0 if len(p) < 3 else float(sum(t == 5 for t in r)) for p, r in zip(prompts, responses)]

    tr = trainer(tmp_path, "grpo.dynamic_sampling=true", "train.max_steps=2", reward=tie_on_short_prompts)
    history = tr.train()
    assert all(m["dropped_groups"] >= 2 and m["refills"] >= 1 for m in history)


def test_bad_settings_and_rewards_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"grpo.group_size must be in \[2, inf\]; got 1"):
        GRPOHyperConfig(group_size=1, minibatch=8)
    with pytest.raises(ValueError, match=r"grpo.eps_high \(0.1\) must be >= grpo.eps_low \(0.2\)"):
        GRPOHyperConfig(eps_high=0.1)
    with pytest.raises(ValueError, match="grpo.loss_agg must be one of"):
        GRPOHyperConfig(loss_agg="sum")
    with pytest.raises(ValueError, match=r"grpo.beta must be in \[0.0, inf\)"):
        GRPOHyperConfig(beta=-1.0)
    with pytest.raises(ValueError, match="needs a reference model"):
        trainer(tmp_path, "grpo.beta=0.1")
    with pytest.raises(ValueError, match="reward_fn must return 16 scores; got shape"):
        trainer(tmp_path, reward=lambda ps, rs: [0.0]).step()
    tr = trainer(tmp_path, "grpo.max_nonfinite=2", reward=lambda ps, rs: [float("nan")] * len(rs))
    assert tr.step()["nonfinite_steps"] == 1
    with pytest.raises(RuntimeError, match="2 non-finite GRPO steps in a row .*non-finite rewards"):
        tr.step()
