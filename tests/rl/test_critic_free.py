"""RLOO and REINFORCE++ on the critic-free trainer (GRPO's own tests: test_grpo.py): their advantages against
the papers' formulas with the KL folded in, a tiny run that learns a rule with the ratio invariant holding,
kill -9 resume that repeats an uninterrupted run bit for bit, weighted reward sources, and bad input."""

from __future__ import annotations

import pytest
import torch
from fastrlhf.config import load_config
from fastrlhf.models import GPT, GPTConfig
from fastrlhf.rl.advantages import check_groups
from fastrlhf.rl.reinforce_pp import ReinforcePPConfig, ReinforcePPHyperConfig, ReinforcePPTrainer
from fastrlhf.rl.rewards import NonFiniteReward, WeightedReward, check_scores, parse_reward
from fastrlhf.rl.rloo import RLOOConfig, RLOOHyperConfig, RLOOTrainer

CFG = GPTConfig(vocab_size=20, block_size=32, n_layer=1, n_head=2, n_embd=16)
EOS = 19
ALGOS = {"rloo": (RLOOConfig, RLOOTrainer), "reinforce_pp": (ReinforcePPConfig, ReinforcePPTrainer)}


def count_fives(prompts, responses):
    return [float(sum(t == 5 for t in r)) for r in responses]


def trainer(tmp_path, algo, *overrides, reward=count_fives, seed=0, with_ref=True):
    cls, trainer_cls = ALGOS[algo]
    cfg = load_config(
        cls,
        None,
        [
            f"train.out_dir={tmp_path}",
            f"{algo}.prompts_per_step=4",
            f"{algo}.group_size=4",
            f"{algo}.minibatch=8",
            f"{algo}.max_new_tokens=6",
            "optim.lr=3e-3",
            "optim.warmup_steps=0",
            "train.max_steps=6",
            "train.ckpt_interval=2",
            "train.device=cpu",
            *overrides,
        ],
    )
    torch.manual_seed(seed)
    policy = GPT(CFG)
    ref = GPT(CFG) if with_ref else None
    if ref is not None:
        ref.load_state_dict(policy.state_dict())
    prompts = [[1, 2, 3], [4, 6], [7, 8, 9, 10], [11]]
    return trainer_cls(cfg, policy, reward, prompts, ref=ref, eos_token_id=EOS, quiet=True)


@pytest.mark.parametrize("algo", ALGOS)
def test_learns_a_rule_with_the_invariant_holding(tmp_path, algo):
    tr = trainer(tmp_path, algo, "train.max_steps=25", f"{algo}.epochs=2")
    before = {k: v.clone() for k, v in tr.policy.state_dict().items()}
    history = tr.train()
    assert all(m["first_ratio_dev"] < 1e-3 for m in history)
    assert all(abs(m["ratio_mean"] - 1) < 0.2 and m["kl_ref"] == m["kl_ref"] for m in history)
    first, last = history[0]["reward_mean"], sum(m["reward_mean"] for m in history[-5:]) / 5
    assert last > first + 0.5, f"mean reward {first:.2f} -> {last:.2f}"
    assert all(not torch.equal(v, tr.policy.state_dict()[k]) for k, v in before.items())
    for key in (
        "pg_loss",
        "clipfrac_low",
        "clipfrac_high",
        "approx_kl",
        "ratio_max",
        "entropy",
        "reward_std",
    ):
        assert history[-1][key] == history[-1][key], key  # logged, not NaN
    assert {"time_generate", "time_score", "time_train", "zero_variance_frac"} <= set(history[-1])


@pytest.mark.parametrize("algo", ALGOS)
def test_resume_repeats_the_uninterrupted_run(tmp_path, algo):
    full = trainer(tmp_path / "full", algo)
    full.train()
    half = trainer(tmp_path / "half", algo)  # killed after 4 of 6 steps, with the checkpoint written there
    for _ in range(4):
        half.step()
    half.save(tmp_path / "half", {})
    again = trainer(tmp_path / "half", algo)  # picks up the step-4 checkpoint, runs to 6
    again.train()
    for k, v in full.policy.state_dict().items():
        assert torch.equal(v, again.policy.state_dict()[k]), k


def test_rloo_advantages_are_leave_one_out_of_the_kl_folded_reward(tmp_path):
    tr = trainer(tmp_path, "rloo", "rloo.kl_coef=0.5", "rloo.group_size=3", "rloo.minibatch=6")
    s_lp = torch.tensor([[-1.0, -2.0], [-0.5, -0.5], [-3.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0], [-0.5, -1.0], [-1.0, -1.0]])
    mask = torch.tensor([[True, True], [True, False], [True, True]])

    class S:  # the two fields advantages() reads
        logprobs, responses = s_lp, torch.zeros(3, 2, dtype=torch.long)

    S.mask = mask
    scores = torch.tensor([1.0, 0.0, 2.0])
    A, extra = tr.advantages(scores, S, mask, ref)
    kl = [(-1.0 + 1.5) + (-2.0 + 1.0), 0.0, (-3.0 + 1.0) + 0.0]  # k1 summed over each answer's tokens
    R = [scores[i].item() - 0.5 * kl[i] for i in range(3)]
    want = torch.tensor([R[i] - (sum(R) - R[i]) / 2 for i in range(3)])
    torch.testing.assert_close(A, want)
    assert extra["kl_ref"] == pytest.approx(sum(kl) / 3)


def test_reinforce_pp_advantages_are_whitened_returns_with_token_kl(tmp_path):
    tr = trainer(tmp_path, "reinforce_pp", "reinforce_pp.kl_coef=0.1")
    lp = torch.tensor([[-1.0, -2.0, -1.0], [-0.5, -0.5, 0.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, -1.0, -2.0], [-0.5, -1.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])

    class S:
        logprobs = lp

    S.mask = mask
    scores = torch.tensor([1.0, -1.0], dtype=torch.float64)
    A, _ = tr.advantages(scores, S, mask, ref)
    r = -0.1 * (lp - ref) * mask  # the KL penalty at every token, the score at the last
    r[0, 2] += 1.0
    r[1, 1] += -1.0
    G = torch.stack([r[:, t:].sum(1) for t in range(3)], dim=1)  # returns, gamma = 1
    live = G[mask]
    want = torch.where(mask, (G - live.mean()) / (live.std() + 1e-8), 0.0)
    torch.testing.assert_close(A.double(), want, rtol=1e-5, atol=1e-6)


def test_reinforce_pp_runs_with_one_sample_per_prompt_and_no_reference(tmp_path):
    tr = trainer(
        tmp_path,
        "reinforce_pp",
        "reinforce_pp.group_size=1",
        "reinforce_pp.prompts_per_step=8",
        "reinforce_pp.kl_coef=0",
        "train.max_steps=2",
        with_ref=False,
    )
    history = tr.train()
    assert len(history) == 2 and history[0]["zero_variance_frac"] != history[0]["zero_variance_frac"]  # NaN


def test_weighted_sources_add_up_and_name_the_bad_one():
    assert parse_reward("task") == [(1.0, "task")]
    assert parse_reward("task + 0.5 * runs/a b/rm + 1e-2 * pkg.mod:fn") == [
        (1.0, "task"),
        (0.5, "runs/a b/rm"),
        (0.01, "pkg.mod:fn"),
    ]
    good = WeightedReward([("a", 1.0, count_fives), ("b", -2.0, lambda ps, rs: [1.0] * len(rs))])
    got = good([[1], [2]], [[5, 5], [3]])
    torch.testing.assert_close(got, torch.tensor([0.0, -2.0]))
    nan = WeightedReward([("a", 1.0, count_fives), ("mine", 0.5, lambda ps, rs: [0.0, float("nan")])])
    with pytest.raises(NonFiniteReward, match=r"reward source 'mine' returned non-finite rewards for 1 of 2"):
        nan([[1], [2]], [[5], [5]])
    short = WeightedReward([("short", 1.0, lambda ps, rs: [0.0])])
    with pytest.raises(ValueError, match=r"reward source 'short' must return 2 scores; got shape \(1,\)"):
        short([[1], [2]], [[5], [5]])
    with pytest.raises(ValueError, match="must return 3 scores"):
        check_scores("reward_fn", [[1.0, 2.0, 3.0]], 3)


@pytest.mark.parametrize("algo", ALGOS)
def test_a_nan_reward_skips_the_step_and_names_it(tmp_path, algo):
    reward = WeightedReward(
        [("task", 1.0, count_fives), ("judge", 1.0, lambda ps, rs: [float("nan")] * len(rs))]
    )
    tr = trainer(tmp_path, algo, f"{algo}.max_nonfinite=2", reward=reward)
    before = {k: v.clone() for k, v in tr.policy.state_dict().items()}
    assert tr.step()["nonfinite_steps"] == 1
    assert all(torch.equal(v, tr.policy.state_dict()[k]) for k, v in before.items())  # no update
    with pytest.raises(RuntimeError, match=rf"2 non-finite {algo.upper()} steps in a row .*'judge' returned"):
        tr.step()


def test_bad_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"rloo.group_size must be in \[2, inf\]; got 1"):
        RLOOHyperConfig(group_size=1, minibatch=8)
    with pytest.raises(ValueError, match=r"rloo.eps_high \(0.1\) must be >= rloo.eps_low \(0.2\)"):
        RLOOHyperConfig(eps_high=0.1)
    with pytest.raises(ValueError, match="reinforce_pp.loss_agg must be one of"):
        ReinforcePPHyperConfig(loss_agg="mean")
    with pytest.raises(ValueError, match=r"reinforce_pp.kl_coef must be in \[0.0, inf\)"):
        ReinforcePPHyperConfig(kl_coef=-0.1)
    with pytest.raises(ValueError, match="dynamic_sampling needs reinforce_pp.group_size >= 2"):
        ReinforcePPHyperConfig(group_size=1, prompts_per_step=16, dynamic_sampling=True)
    with pytest.raises(ValueError, match=r"rloo.kl_coef = 0.05 needs a reference model"):
        trainer(tmp_path, "rloo", with_ref=False)
    with pytest.raises(ValueError, match=r"group 1 \(rows 2..3\) holds different prompts"):
        check_groups([[1], [1], [2], [3]], 2)
    check_groups([[1], [1], [2], [2]], 2)
    with pytest.raises(ValueError, match="must return 16 scores"):
        trainer(tmp_path, "rloo", reward=lambda ps, rs: [0.0]).step()


def test_group_response_hidden_equals_the_full_forward(tmp_path):
    from fastrlhf.rl.rollout import group_response_hidden, response_hidden, sample

    torch.manual_seed(0)
    model = GPT(CFG)
    prompts = [p for p in ([1, 2, 3], [4], [7, 8, 9, 10]) for _ in range(3)]  # ragged: left pads
    s = sample(
        model, prompts, 5, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=EOS, generator=torch.Generator()
    )
    rows = torch.tensor([6, 7, 8, 0, 1, 2])  # groups 2 and 0
    with torch.no_grad():
        want = response_hidden(model, s, rows)  # (6, Tr, C)
        got = group_response_hidden(model, s, rows, 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_lora_trains_the_adapters_with_the_base_as_the_reference(tmp_path):
    """issue 20: with LoRA no reference copy is passed or loaded; the reference's log-probs are the policy's
    with its adapters off, so at the first step (B = 0) the KL to it is 0; only the adapters move, and a
    resumed LoRA run repeats the uninterrupted one."""
    from fastrlhf.models.lora import LoraConfig, adapters_off, add_lora, lora_layers

    def lora_trainer(path):
        tr = trainer(path, "rloo", "rloo.kl_coef=0", with_ref=False)  # its config and policy, built again:
        tr.cfg.rloo.kl_coef = 0.1
        torch.manual_seed(1)
        add_lora(tr.policy, LoraConfig(r=2, alpha=4.0, targets=["c_attn", "c_fc"]))
        return type(tr)(tr.cfg, tr.policy, count_fives, tr.prompts, eos_token_id=EOS, quiet=True)

    tr = lora_trainer(tmp_path / "full")
    base = {k: v.clone() for k, v in tr.policy.state_dict().items() if ".lora_" not in k}
    first = tr.step()
    assert abs(first["kl_ref"]) < 1e-6 and first["first_ratio_dev"] < 1e-3  # fp32 rounding: decode vs full
    history = [first] + [tr.step() for _ in range(5)]
    assert any(abs(m["kl_ref"]) > 1e-4 for m in history[1:])  # the adapters moved the policy off its base
    state = tr.policy.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in base.items())  # the base never moves
    assert all(m.lora_B.weight.abs().max() > 0 for m in lora_layers(tr.policy))
    x = torch.tensor([[1, 2, 3, 5, 5]])
    with torch.no_grad(), adapters_off(tr.policy):
        plain = GPT(CFG)
        plain.load_state_dict(base, strict=False)
        torch.testing.assert_close(tr.policy(x)[0], plain.eval()(x)[0])
    half = lora_trainer(tmp_path / "half")
    for _ in range(4):
        half.step()
    half.save(tmp_path / "half", {})
    again = lora_trainer(tmp_path / "half")
    again.train()
    for k, v in state.items():
        assert torch.equal(v, again.policy.state_dict()[k]), k
