import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from fastrlhf import ops
from fastrlhf.config import load_config
from fastrlhf.data import corpus
from fastrlhf.io import checkpoint as ckpt
from fastrlhf.io.safetensors import read_safetensors
from fastrlhf.models import GPT, GPTConfig, ScalarHeadModel
from fastrlhf.models.load import load_model
from fastrlhf.rl.config import PPOConfig
from fastrlhf.rl.kl import AdaptiveKLController, KLController, kl_penalty, shape_rewards
from fastrlhf.rl.ppo import PPOTrainer
from fastrlhf.train.log import read_jsonl
from helpers.pretrain import make_text

TINY = GPTConfig(vocab_size=61, block_size=32, n_layer=2, n_head=2, n_embd=32)
EOS = 0
BASE = [
    "ppo.rollout_batch=8",
    "ppo.minibatch=4",
    "ppo.ppo_epochs=2",
    "ppo.max_new_tokens=8",
    "optim.lr=1e-3",
    "optim.min_lr=1e-3",
    "optim.warmup_steps=0",
    "train.max_steps=3",
    "train.log_interval=1",
]
METRICS = [
    "score_mean",
    "score_std",
    "rlhf_reward",
    "non_score_reward",
    "kl",
    "kl_coef",
    "entropy",
    "pg_loss",
    "v_loss",
    "clipfrac",
    "vf_clipfrac",
    "approx_kl",
    "ratio_mean",
    "ratio_max",
    "explained_variance",
    "response_length",
    "eos_frac",
    "time_generate",
    "time_score",
    "time_train",
    "tokens_per_s",
    "first_ratio_dev",
    "first_approx_kl",
    "grad_norm",
    "lr",
]


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one thread is fastest, and on a loaded 2-core machine OpenMP's spinning
    threads make two 10x slower. Restored afterwards so no other test is affected."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def config(*extra):
    return load_config(PPOConfig, None, BASE + list(extra))


def prompts(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(
            1, TINY.vocab_size, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g
        ).tolist()
        for _ in range(n)
    ]


def make_trainer(*extra, reward=None, value=None, **kw):
    cfg = config(*extra)
    torch.manual_seed(0)
    policy = GPT(TINY)
    ref = GPT(TINY)
    ref.load_weights(policy.weights())
    reward = ScalarHeadModel(TINY) if reward is None else reward
    return PPOTrainer(
        cfg, policy, ref, reward, prompts(), value_model=value, eos_token_id=EOS, quiet=True, **kw
    )


def test_true_score_is_logged_never_trained_on():
    seen = []

    def truth(prompts, responses):  # (ids, ids) of this step's rollouts; the mask keeps up to EOS
        seen.append((prompts, responses))
        return [float(len(r)) for r in responses]

    def timing(key):
        return key.startswith("time") or key == "tokens_per_s"

    plain, checked = make_trainer(), make_trainer(true_score=truth)
    a, b = plain.step(), checked.step()
    ((ps, rs),) = seen
    assert len(ps) == len(rs) == checked.cfg.ppo.rollout_batch and all(1 <= len(r) <= 8 for r in rs)
    assert b["true_score"] == pytest.approx(sum(map(len, rs)) / len(rs))
    assert b["true_score"] == pytest.approx(b["response_length"])  # lengths include the EOS, like the mask
    assert "true_score" not in a and {k: v for k, v in b.items() if k != "true_score" and not timing(k)} == {
        k: v for k, v in a.items() if not timing(k)
    }


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


@pytest.mark.parametrize("value_model", ["separate", "policy_head"])
def test_steps_are_finite_hold_invariants_and_train_every_parameter(value_model):
    tr = make_trainer(f"ppo.value_model={value_model}")
    frozen = [snapshot(tr.ref), snapshot(tr.reward)]
    trained = snapshot(tr.trained)
    for _ in range(2):
        m = tr.step()
        assert all(math.isfinite(m[k]) for k in METRICS), m
        assert abs(m["kl_coef"] - 0.05) < 1e-12 and m["nonfinite_steps"] == 0
        assert 1 <= m["response_length"] <= 8 and 0 <= m["eos_frac"] <= 1
        assert m["first_ratio_dev"] < 1e-4 and abs(m["first_approx_kl"]) < 1e-5
    assert tr.updates == 2 * 2 * 2
    for name, before in trained.items():
        assert not torch.equal(before, dict(tr.trained.named_parameters())[name]), f"{name} did not change"
    for before, module in zip(frozen, (tr.ref, tr.reward)):
        assert all(torch.equal(v, dict(module.named_parameters())[k]) for k, v in before.items())


def test_first_minibatch_matches_the_sampler():
    """ratio == 1 and approx_kl == 0 at the first minibatch; broken (dropout on) it raises."""
    tr = make_trainer("ppo.ppo_epochs=1", "ppo.minibatch=8")
    batch = tr._next_prompts()
    ro = tr.rollout(tr.generate(batch), batch)
    _, stats, deviation = tr._minibatch_loss(ro, torch.arange(8))
    assert deviation[0] < 1e-4 and deviation[1] < 1e-5 and abs(float(stats["approx_kl"])) < 1e-5
    assert abs(float(stats["ratio_mean"]) - 1) < 1e-5
    cfg = config()
    policy = GPT(GPTConfig(**{**TINY.to_dict(), "dropout": 0.5}))
    ref = GPT(policy.config)
    tr = PPOTrainer(cfg, policy, ref, ScalarHeadModel(policy.config), prompts(), eos_token_id=EOS, quiet=True)
    tr.policy.train()  # dropout in the scorer but not in the sampler: the invariant must catch it
    with pytest.raises(RuntimeError, match="PPO invariant broken at step 1"):
        tr.step()


def test_reward_for_a_token_makes_the_policy_write_it():
    target = 7

    def reward_fn(_, responses):
        return [sum(t == target for t in r) / max(len(r), 1) for r in responses]

    tr = make_trainer(
        "ppo.rollout_batch=16",
        "ppo.minibatch=8",
        "ppo.ppo_epochs=4",
        "optim.lr=3e-3",
        "optim.min_lr=3e-3",
        "ppo.temperature=1.0",
        "ppo.kl_coef=0.01",
        "train.max_steps=16",
        reward=reward_fn,
    )
    scores = [tr.step()["score_mean"] for _ in range(16)]  # learning shows from about step 10
    assert sum(scores[:2]) / 2 < 0.05 and sum(scores[-2:]) / 2 > 0.2, scores  # from 1/61 by chance


def test_kl_estimators_shaping_and_controllers():
    logp, ref = torch.tensor([[-1.0, -2.0, -0.5]]), torch.tensor([[-1.5, -1.0, -0.5]])
    assert torch.allclose(kl_penalty(logp, ref, "k1"), logp - ref)
    k3 = kl_penalty(logp, ref, "k3")
    r = (ref - logp).exp()
    assert torch.allclose(k3, (r - 1) - r.log()) and bool((k3 >= 0).all())
    mask = torch.tensor([[True, True, False], [True, False, False]])
    rew = shape_rewards(torch.tensor([2.0, -1.0]), torch.ones(2, 3) * mask, 0.1, mask)
    assert torch.allclose(rew, torch.tensor([[-0.1, 1.9, 0.0], [-1.1, 0.0, 0.0]]))
    fixed = KLController(0.2)
    fixed.update(100.0, 8)
    assert fixed.value == 0.2
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=100)
    ctl.update(12.0, 10)  # error clipped to +0.2: coef *= 1 + 0.2 * 10 / 100
    assert ctl.value == pytest.approx(0.2 * 1.02)
    ctl.update(6.0 * 0.9, 10)  # 10 % under target: coef *= 1 - 0.1 * 0.1
    assert ctl.value == pytest.approx(0.2 * 1.02 * 0.99)
    ctl.update(float("nan"), 10)
    assert ctl.value == pytest.approx(0.2 * 1.02 * 0.99)


def test_adaptive_controller_in_the_trainer_lowers_the_coef_under_target():
    tr = make_trainer("ppo.adaptive_kl=true", "ppo.kl_target=100", "ppo.kl_horizon=16", "ppo.kl_estimator=k3")
    coefs = [tr.step()["kl_coef"] for _ in range(3)]
    assert coefs[0] == 0.05 and coefs[0] > coefs[1] > coefs[2]  # KL << target: e = -0.2, x (1 - 0.2 * 8 / 16)
    assert tr.kl_ctl.value == pytest.approx(0.05 * 0.9**3)


def test_non_finite_steps_are_skipped_counted_then_abort():
    calls = []

    def reward_fn(_, responses):
        calls.append(1)
        return [math.nan if len(calls) in (1, 3, 4) else 1.0] * len(responses)

    tr = make_trainer("ppo.max_nonfinite=2", reward=reward_fn)
    before = snapshot(tr.trained)
    m = tr.step()
    assert m["nonfinite_steps"] == 1 and math.isnan(m["pg_loss"]) and tr.updates == 0
    assert all(torch.equal(v, dict(tr.trained.named_parameters())[k]) for k, v in before.items())
    assert tr.step()["nonfinite_steps"] == 1 and tr.updates == 4
    tr.step()
    with pytest.raises(RuntimeError, match="2 non-finite PPO steps in a row"):
        tr.step()


@pytest.mark.parametrize("whiten", [True, False])
def test_advantages_are_gae_whitened_or_not(whiten):
    tr = make_trainer(f"ppo.whiten_advantages={str(whiten).lower()}")
    batch = tr._next_prompts()
    ro = tr.rollout(tr.generate(batch), batch)
    gae, _ = ops.gae(ro.rewards, ro.values, ro.mask, gamma=1.0, lam=0.95)  # (B, Tr)
    live = ro.advantages[ro.mask]
    if whiten:
        assert abs(float(live.mean())) < 1e-5 and abs(float(live.std()) - 1) < 0.05
    else:
        assert torch.equal(ro.advantages, gae)


def test_value_warmup_trains_only_the_critic_first():
    tr = make_trainer("ppo.value_warmup_steps=1", "optim.weight_decay=0")
    policy0 = {k: v.clone() for k, v in tr.policy.state_dict().items()}
    value0 = {k: v.clone() for k, v in tr.value.state_dict().items()}
    tr.step()  # warm-up: advantages zeroed, the value loss alone
    assert all(torch.equal(v, tr.policy.state_dict()[k]) for k, v in policy0.items())
    assert not all(torch.equal(v, tr.value.state_dict()[k]) for k, v in value0.items())
    tr.step()  # PPO proper
    assert not all(torch.equal(v, tr.policy.state_dict()[k]) for k, v in policy0.items())


@pytest.mark.parametrize("value_model", ["separate", "policy_head"])
def test_value_lr_scales_only_the_critics_steps(value_model):
    """optim.value_lr: the value function's groups follow the schedule at value_lr / lr times the policy's
    rate; the policy's groups hold exactly the policy's parameters."""
    tr = make_trainer(
        f"ppo.value_model={value_model}", "optim.lr=1e-4", "optim.min_lr=1e-5", "optim.value_lr=3e-3"
    )
    tr.step()
    lrs = [g["lr"] for g in tr.optimizer.param_groups]  # policy decay/no-decay, value decay/no-decay
    assert lrs[0] == lrs[1] > 0 and lrs[2] == lrs[3] == pytest.approx(30 * lrs[0], rel=1e-12)
    policy_params = {id(q) for g in tr.optimizer.param_groups[:2] for q in g["params"]}
    assert policy_params == {id(q) for q in tr.policy.parameters()}
    same = make_trainer(f"ppo.value_model={value_model}", "optim.lr=1e-4", "optim.min_lr=1e-5")
    same.step()
    assert len({g["lr"] for g in same.optimizer.param_groups}) == 1


def test_ptx_adds_a_pretraining_loss():
    tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, 500).astype(np.uint16)
    tr = make_trainer("ppo.ptx_coef=0.5", "ppo.ptx_block=16", ptx_tokens=tokens)
    m = tr.step()
    assert math.isfinite(m["ptx_loss"]) and m["ptx_loss"] > 3.0  # random 61-way text: about ln 61 = 4.1
    with pytest.raises(ValueError, match="ppo.ptx_coef = 0.5 needs pretraining tokens"):
        make_trainer("ppo.ptx_coef=0.5")
    with pytest.raises(ValueError, match=r"ppo.ptx_block \(33\) exceeds the policy's block_size \(32\)"):
        make_trainer("ppo.ptx_coef=0.5", "ppo.ptx_block=33", ptx_tokens=tokens)


@pytest.mark.parametrize(
    "override, match",
    [
        ("ppo.clip_range=1.5", r"ppo.clip_range must be in \(0.0, 1.0\); got 1.5"),
        ("ppo.minibatch=3", r"ppo.rollout_batch \(8\) must be a multiple of ppo.minibatch \(3\)"),
        ("ppo.top_k=5", "ppo.top_k=5 .*allow_sampling_mismatch"),
        ("ppo.top_p=0.9", "ppo.top_p=0.9 .*allow_sampling_mismatch"),
        ("ppo.temperature=0", r"ppo.temperature must be in \(0.0, inf\]; got 0.0"),
        ("ppo.kl_estimator=k2", r"ppo.kl_estimator must be one of \['k1', 'k3'\]; got 'k2'"),
        ("ppo.value_model=shared", "ppo.value_model must be one of"),
        ("ppo.lam=1.5", r"ppo.lam must be in \[0.0, 1.0\]; got 1.5"),
        ("optim.value_lr=-1", r"optim.value_lr must be >= 0 \(0 = optim.lr\); got -1.0"),
        ("ppo.value_warmup_steps=-1", r"ppo.value_warmup_steps must be in \[0, inf\]; got -1"),
        ("ppo.kl_coef=-1", r"ppo.kl_coef must be in \[0.0, inf\); got -1.0"),
        ("train.max_steps=0", r"train.max_steps must be in \[1, inf\]; got 0"),
        ("ppo.clip_rnage=0.1", r"unknown field\(s\) \['ppo.clip_rnage'\]"),
    ],
)
def test_bad_configs_name_the_field_and_range(override, match):
    with pytest.raises(ValueError, match=match):
        config(override)


def test_allowed_sampling_mismatch_runs():
    m = make_trainer("ppo.top_k=10", "ppo.allow_sampling_mismatch=true", "ppo.check_invariants=false").step()
    assert math.isfinite(m["pg_loss"])


def test_prompts_too_long_for_the_context_are_refused():
    with pytest.raises(
        ValueError, match=r"\+ ppo.max_new_tokens \(30\) exceeds the policy's block_size \(32\)"
    ):
        make_trainer("ppo.max_new_tokens=30")


# ---- checkpoints, tokenizers and the command line --------------------------------------------------------
@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory):
    """An 'SFT' and a 'reward model' checkpoint sharing a 300-token BPE, and a prompt file."""
    root = tmp_path_factory.mktemp("ppo_inputs")
    docs = [make_text(200, s) for s in range(2)]
    tok = corpus.build_tokenizer("bpe", docs, 300)
    cfg = GPTConfig(vocab_size=300, block_size=48, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(1)
    state = {"config": {"model": cfg.to_dict()}}
    rm_state = {"model": cfg.to_dict()}  # the layout `python -m fastrlhf rm` writes (train/reward.py)
    ckpt.save_checkpoint(root / "sft", 0, models={"model": GPT(cfg)}, state=state, tokenizer=tok)
    ckpt.save_checkpoint(
        root / "rm", 0, models={"model": ScalarHeadModel(cfg)}, state=rm_state, tokenizer=tok
    )
    other = corpus.build_tokenizer("bpe", [make_text(200, 7).lower()], 300)
    ckpt.save_checkpoint(
        root / "rm_other_tok", 0, models={"model": ScalarHeadModel(cfg)}, state=rm_state, tokenizer=other
    )
    (root / "prompts.txt").write_text(
        "".join(f"{n} the {w}\n" for n in ("ROMEO", "LEAR", "FOOL") for w in ("king", "queen", "moon", "sea"))
    )
    return root


def cli_args(root, out, *extra):
    return [
        "--quiet",
        f"models.policy={root / 'sft'}",
        f"models.reward={root / 'rm'}",
        f"train.prompts={root / 'prompts.txt'}",
        f"train.out_dir={out}",
        "train.threads=1",
        *BASE,
        *extra,
    ]


def run_cli(args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "fastrlhf", "ppo", *args], env=env, stderr=subprocess.PIPE, **kw
    )


def test_resume_after_kill_9_reproduces_the_uninterrupted_run(stage_inputs, tmp_path):
    steps = ["train.max_steps=8", "train.ckpt_interval=2"]
    full = run_cli(cli_args(stage_inputs, tmp_path / "full", *steps))
    victim = run_cli(cli_args(stage_inputs, tmp_path / "killed", *steps))
    latest = tmp_path / "killed" / "latest"
    deadline = time.time() + 60
    while not latest.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert full.wait() == 0, full.communicate()[1].decode()
    full.communicate()
    killed_at = ckpt.read_state(ckpt.latest_checkpoint(tmp_path / "killed"))["step"]
    assert victim.returncode == -signal.SIGKILL and killed_at < 8
    resumed = run_cli(cli_args(stage_inputs, tmp_path / "killed", *steps))
    err = resumed.communicate()[1].decode()
    assert resumed.returncode == 0, err
    drop = ("time_generate", "time_score", "time_train", "tokens_per_s", "time_s")
    key = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]
    want, got = read_jsonl(tmp_path / "full" / "log.jsonl"), read_jsonl(tmp_path / "killed" / "log.jsonl")
    assert [r["step"] for r in got] == list(range(1, 9))
    assert key(got) == key(want)
    a = read_safetensors(tmp_path / "full" / "step_0000008" / "value.safetensors")
    b = read_safetensors(tmp_path / "killed" / "step_0000008" / "value.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    policy, tok = load_model(tmp_path / "killed")  # the PPO policy loads like any GPT checkpoint
    assert tok is not None and policy.config.vocab_size == 300


def test_cli_refuses_another_tokenizer_and_names_missing_inputs(stage_inputs, tmp_path, capsys):
    from fastrlhf.cli import main

    args = cli_args(stage_inputs, tmp_path / "o", f"models.reward={stage_inputs / 'rm_other_tok'}")
    with pytest.raises(ValueError, match="reward model's tokenizer differs from the policy's"):
        from fastrlhf.rl.build import build_trainer

        build_trainer(load_config(PPOConfig, None, args[1:]), quiet=True)
    with pytest.raises(
        FileNotFoundError, match=r"models.reward = .*nope does not exist: run `python -m fastrlhf rm`"
    ):
        build_trainer(
            load_config(
                PPOConfig, None, cli_args(stage_inputs, tmp_path / "o", f"models.reward={tmp_path}/nope")[1:]
            )
        )
    assert main(["ppo", "--quiet", "models.policy="]) == 2
    ptx = cli_args(stage_inputs, tmp_path / "o", "ppo.ptx_coef=0.5", f"train.ptx_data={tmp_path}")
    with pytest.raises(ValueError, match=rf"train.ptx_data = {tmp_path} is a folder; give a token file"):
        build_trainer(load_config(PPOConfig, None, ptx[1:]))
    # without --quiet and with the output a pipe (capsys): log lines instead of a progress bar
    assert main(["ppo", *cli_args(stage_inputs, tmp_path / "p", "train.max_steps=1")[1:]]) == 0
    assert "step      1  score" in capsys.readouterr().out


def test_gold_reward_trains_on_the_true_score_without_loading_a_reward_model(stage_inputs, tmp_path):
    from fastrlhf.rl.build import build_trainer

    cfg = load_config(
        PPOConfig, None, cli_args(stage_inputs, tmp_path / "o", f"models.reward={tmp_path}/nope")[1:]
    )
    with pytest.raises(ValueError, match="gold_reward=True trains on true_score: pass one"):
        build_trainer(cfg, quiet=True, gold_reward=True)
    tr = build_trainer(
        cfg, quiet=True, true_score=lambda prompt, response: float(len(response)), gold_reward=True
    )
    assert tr.reward is tr.true_score  # no RM was read: models.reward does not exist
    policy, value = (
        dict(tr.policy.weights()),
        dict(tr.value.trunk.weights()),
    )  # the critic starts as the policy
    assert value and all(torch.equal(w, policy[k]) for k, w in value.items())


def test_a_non_finite_loss_skips_the_update():
    tr = make_trainer()
    before = snapshot(tr.trained)
    loss_fn = tr._minibatch_loss

    def nan_loss(ro, mb, *rest):
        loss, s, d = loss_fn(ro, mb, *rest)
        return loss * math.nan, s, d

    tr._minibatch_loss = nan_loss
    m = tr.step()
    assert m["nonfinite_steps"] == 1 and math.isnan(m["pg_loss"]) and tr.updates == 0
    assert all(torch.equal(v, dict(tr.trained.named_parameters())[k]) for k, v in before.items())
    assert tr.kl_ctl.value == 0.05


def test_lora_ppo_uses_the_base_as_its_reference_and_trains_only_adapters_and_the_value_head():
    """issue 20: one copy of the base weights; the reference log-probs are the policy's with its adapters
    off, so the first step's KL is 0 up to fp32 rounding, and the base never moves."""
    from fastrlhf.models.lora import LoraConfig, add_lora, lora_layers

    cfg = config("ppo.value_model=policy_head", "train.max_steps=4", "optim.lr=1e-2")
    torch.manual_seed(0)
    policy = GPT(TINY)
    add_lora(policy, LoraConfig(r=2, alpha=4.0, targets=["c_attn", "c_fc"]))
    base = {k: v.clone() for k, v in policy.state_dict().items() if ".lora_" not in k}
    tr = PPOTrainer(cfg, policy, None, ScalarHeadModel(TINY), prompts(), eos_token_id=EOS, quiet=True)
    first = tr.step()
    assert abs(first["kl"]) < 1e-5 and first["first_ratio_dev"] < 1e-3
    later = [tr.step() for _ in range(3)]
    assert any(abs(m["kl"]) > 1e-4 for m in later)
    assert all(torch.equal(v, policy.state_dict()[k]) for k, v in base.items())
    assert all(m.lora_B.weight.abs().max() > 0 for m in lora_layers(policy))
    with pytest.raises(ValueError, match="ref is None: only a LoRA policy"):
        PPOTrainer(cfg, GPT(TINY), None, ScalarHeadModel(TINY), prompts(), eos_token_id=EOS, quiet=True)
