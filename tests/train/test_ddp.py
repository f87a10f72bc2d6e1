"""Two CPU processes with gloo (torch.multiprocessing, the environment torchrun would set) run SFT, RM
and PPO on tiny models; each run's curve must match one process on the same global batch, and both
ranks must end with the same weights. The ranks are started once for all scenarios, by fork: a spawned
process spends ~10 s here importing torch and torch._dynamo again (the workers use one thread, so the
parent's OpenMP pool is never entered after the fork, as in DataLoader workers). The tests then read
what the ranks wrote."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from fastrlhf.config import load_config
from fastrlhf.models import GPT, GPTConfig, ScalarHeadModel
from fastrlhf.rl.config import PPOConfig
from fastrlhf.rl.ppo import PPOTrainer
from fastrlhf.rl.stats import global_masked_moments, masked_mean, masked_var
from fastrlhf.train import dist
from fastrlhf.train import reward as reward_mod
from fastrlhf.train import sft as sft_mod
from fastrlhf.train.log import read_jsonl
from fastrlhf.train.pretrain import PretrainConfig, pretrain
from fastrlhf.train.reward import RMConfig, train_rm
from fastrlhf.train.sft import sft
from helpers.pretrain import TINY as TINY_PRETRAIN
from helpers.sft import arithmetic_rankings, sft_config, write_demos, write_ranking_file
from safetensors.torch import load_file, save_file

WORLD = 2
RANKS_TIMEOUT_S = 300  # they take ~5 s on 2 cores
PRE_ARGS = [
    "train.max_steps=4",
    "train.eval_interval=2",
    "train.eval_batches=3",
    "train.grad_accum=2",
    "train.device=cpu",
    "train.threads=1",
]
SFT_ARGS = ["train.max_steps=6", "train.ckpt_interval=3", "train.eval_interval=3", "train.threads=1"]
SFT_LORA = [*SFT_ARGS, "lora.r=2", "lora.alpha=4", "lora.targets=c_attn,c_fc", "optim.lr=1e-2"]
RM_ARGS = [
    "train.device=cpu",
    "train.batch_size=4",
    "train.log_interval=1",
    "train.max_steps=6",
    "train.eval_interval=3",
    "train.threads=1",
    "optim.lr=2e-3",
    "optim.warmup_steps=3",
]
TINY = GPTConfig(vocab_size=61, block_size=32, n_layer=2, n_head=2, n_embd=32)
EOS = 0
# top_k=1: greedy rollouts do not depend on the ranks' sampling seeds, so the 2-rank run sees the very
# episodes one process sees; the logprobs stay those of the full softmax, so PPO still has gradients.
# minibatch = rollout_batch: the update's global minibatch is then the same set of episodes too.
PPO_EXACT = [
    "ppo.rollout_batch=8",
    "ppo.minibatch=8",
    "ppo.ppo_epochs=2",
    "ppo.max_new_tokens=6",
    "ppo.top_k=1",
    "ppo.allow_sampling_mismatch=true",
    "ppo.whiten_rewards=true",
    "ppo.adaptive_kl=true",
    "ppo.kl_target=0.01",
    "ppo.kl_horizon=100",
    "optim.lr=3e-3",
    "optim.warmup_steps=0",
    "train.max_steps=3",
    "train.ckpt_interval=0",
    "train.device=cpu",
]
# sampled rollouts (a stream per rank), two minibatches, the value head on the policy, PPO-ptx
PPO_SAMPLED = [
    "ppo.rollout_batch=8",
    "ppo.minibatch=4",
    "ppo.ppo_epochs=1",
    "ppo.max_new_tokens=6",
    "ppo.value_model=policy_head",
    "ppo.adaptive_kl=true",
    "ppo.ptx_coef=0.5",
    "ppo.ptx_block=8",
    "optim.lr=3e-3",
    "train.max_steps=2",
    "train.device=cpu",
]


def pretrain_config(data_dir, out):
    return load_config(
        PretrainConfig,
        None,
        TINY_PRETRAIN + [f"train.data_dir={data_dir}", f"train.out_dir={out}", *PRE_ARGS],
    )


def ppo_trainer(out, args):
    cfg = load_config(PPOConfig, None, args + [f"train.out_dir={out}"])
    torch.manual_seed(0)
    policy, ref, reward = GPT(TINY), GPT(TINY), ScalarHeadModel(TINY)
    ref.load_weights(policy.weights())
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, TINY.vocab_size, (16, 4), generator=g).tolist()  # one length: the same padding
    ptx = torch.randint(0, TINY.vocab_size, (400,), generator=g).numpy()
    return PPOTrainer(cfg, policy, ref, reward, prompts, eos_token_id=EOS, ptx_tokens=ptx, quiet=True)


def _capture(module, name, root):
    """Wrap module.run_loop so that each rank saves the weights it ends with (name_rank<r>.safetensors)."""
    real = module.run_loop

    def run_loop(**kw):
        out = real(**kw)
        model = kw["model"].module  # the DDP wrapper's model
        weights = {k: v.contiguous() for k, v in model.weights().items()}
        save_file(weights, root / f"{name}_rank{dist.rank()}.safetensors")
        return out

    module.run_loop = run_loop


def _worker(rank, port, root, sft_run, data_dir):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    dist.setup("cpu")
    _capture(sft_mod, "sft", root)
    _capture(reward_mod, "rm", root)
    pretrain(pretrain_config(data_dir, root / "pre2"), quiet=True)
    sft(  # LoRA first: the plain run after it leaves its weights in sft_rank<r>.safetensors
        sft_config(f"data.source={root / 'demos.jsonl'}", f"train.out_dir={root / 'sft2_lora'}", *SFT_LORA),
        quiet=True,
    )
    sft(
        sft_config(f"data.source={root / 'demos.jsonl'}", f"train.out_dir={root / 'sft2'}", *SFT_ARGS),
        quiet=True,
    )
    if rank == 0:  # as if the run had died after its step-3 checkpoint
        shutil.copytree(root / "sft2" / "step_0000003", root / "sft2_resumed" / "step_0000003")
        (root / "sft2_resumed" / "latest").write_text("step_0000003\n")
    dist.barrier()
    sft(
        sft_config(
            f"data.source={root / 'demos.jsonl'}", f"train.out_dir={root / 'sft2_resumed'}", *SFT_ARGS
        ),
        quiet=True,
    )
    train_rm(
        load_config(
            RMConfig,
            None,
            [
                f"train.sft={sft_run}",
                f"data.train={root / 'r.jsonl'}",
                f"train.out_dir={root / 'rm2'}",
                *RM_ARGS,
            ],
        ),
        quiet=True,
    )
    try:
        ppo_trainer(root / "ppo_bad", PPO_EXACT + ["ppo.rollout_batch=6", "ppo.minibatch=3"])
    except ValueError as exc:
        (root / f"bad_rank{rank}.txt").write_text(str(exc))
    for name, args in (("ppo", PPO_EXACT), ("ppo_sampled", PPO_SAMPLED)):
        tr = ppo_trainer(root / f"{name}2", args)
        tr.train()
        save_file(
            {
                f"{m}.{k}": v.contiguous()
                for m in ("policy", "value")
                for k, v in tr.trained[m].weights().items()
            },
            root / f"{name}_rank{rank}.safetensors",
        )
        (root / f"{name}_kl_rank{rank}.json").write_text(json.dumps(tr.kl_ctl.value))
    del tr  # its DDP models must die before the group does (see dist.cleanup)
    dist.cleanup()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(sft_run, data_dir, tmp_path_factory):
    """The 2-rank runs (one spawn) and their single-process twins (here, one thread)."""
    root = tmp_path_factory.mktemp("ddp")
    write_demos(root / "demos.jsonl")
    write_ranking_file(root / "r.jsonl", arithmetic_rankings(48, ks=(4, 2, 3)))
    ranks = mp.start_processes(
        _worker, args=(_free_port(), root, sft_run, data_dir), nprocs=WORLD, start_method="fork", join=False
    )
    deadline = time.monotonic() + RANKS_TIMEOUT_S
    while not ranks.join(timeout=1):  # a rank that fails raises here; one that hangs is killed
        if time.monotonic() > deadline:
            for p in ranks.processes:
                p.kill()
            pytest.fail(
                f"the 2-rank runs did not finish within {RANKS_TIMEOUT_S} s; their files: "
                f"{sorted(f.name for f in root.iterdir())}"
            )
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pretrain(pretrain_config(data_dir, root / "pre1"), quiet=True)
        sft(
            sft_config(f"data.source={root / 'demos.jsonl'}", f"train.out_dir={root / 'sft1'}", *SFT_ARGS),
            quiet=True,
        )
        sft(
            sft_config(
                f"data.source={root / 'demos.jsonl'}", f"train.out_dir={root / 'sft1_lora'}", *SFT_LORA
            ),
            quiet=True,
        )
        train_rm(
            load_config(
                RMConfig,
                None,
                [
                    f"train.sft={sft_run}",
                    f"data.train={root / 'r.jsonl'}",
                    f"train.out_dir={root / 'rm1'}",
                    *RM_ARGS,
                ],
            ),
            quiet=True,
        )
        tr = ppo_trainer(root / "ppo1", PPO_EXACT)
        tr.train()
    finally:
        torch.set_num_threads(before)
    return root


def curve(path, keys):
    return [[r[k] for k in keys] for r in read_jsonl(path) if all(k in r for k in keys)]


def assert_same_weights(root, name):
    a, b = (load_file(root / f"{name}_rank{r}.safetensors") for r in range(WORLD))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), f"{name}: the ranks' weights differ"


def assert_close_curves(one, two):
    assert len(one) == len(two) and len(one) >= 2
    for r1, r2 in zip(one, two):
        assert all(math.isclose(x, y, rel_tol=2e-4, abs_tol=1e-5) for x, y in zip(r1, r2)), (one, two)


def test_pretrain_two_ranks_match_one_process(runs):
    """grad_accum = 2: the first micro-batch's backward skips DDP's all-reduce (no_sync), the second syncs."""
    for keys in (["step", "loss", "grad_norm"], ["step", "val_loss"]):
        assert_close_curves(
            curve(runs / "pre1" / "log.jsonl", keys), curve(runs / "pre2" / "log.jsonl", keys)
        )


@pytest.mark.slow
def test_torchrun_cli_computes_what_the_api_computes(runs, data_dir, tmp_path):
    """`torchrun -m fastrlhf pretrain`: rank 0 alone prints and logs, and the log is the 2-rank run's above."""
    overrides = TINY_PRETRAIN + PRE_ARGS + [f"train.data_dir={data_dir}", f"train.out_dir={tmp_path}"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={WORLD}",
        "-m",
        "fastrlhf",
        "pretrain",
        *overrides,
    ]
    res = subprocess.run(
        cmd,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("step      4  loss") == 1  # printed once, by rank 0
    keys = ["step", "loss", "grad_norm", "val_loss"]
    want = [{k: r.get(k) for k in keys} for r in read_jsonl(runs / "pre2" / "log.jsonl")]
    got = [{k: r.get(k) for k in keys} for r in read_jsonl(tmp_path / "log.jsonl")]
    assert got == want


def test_sft_two_ranks_match_one_process(runs):
    keys = ["step", "loss", "grad_norm", "lr"]
    assert_close_curves(curve(runs / "sft1" / "log.jsonl", keys), curve(runs / "sft2" / "log.jsonl", keys))
    val = ["step", "val_loss"]
    assert_close_curves(curve(runs / "sft1" / "log.jsonl", val), curve(runs / "sft2" / "log.jsonl", val))
    assert_same_weights(runs, "sft")
    one, two = (load_file(runs / f"sft{n}" / "step_0000006" / "model.safetensors") for n in (1, 2))
    assert all(torch.allclose(one[k], two[k], rtol=1e-3, atol=1e-4) for k in one)


def test_lora_sft_two_ranks_match_one_process(runs):
    """LoRA under DDP: the frozen base takes no part in the all-reduce, the adapters' gradients do."""
    keys = ["step", "loss", "grad_norm", "lr"]
    one, two = (curve(runs / f"sft{n}_lora" / "log.jsonl", keys) for n in (1, 2))
    assert_close_curves(one, two)
    a, b = (load_file(runs / f"sft{n}_lora" / "step_0000006" / "model.safetensors") for n in (1, 2))
    adapters = [k for k in a if ".lora_" in k]
    assert adapters and all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5) for k in adapters)
    assert all(torch.equal(a[k], b[k]) for k in a if ".lora_" not in k)  # the base never moved


def test_sft_resume_under_two_ranks_repeats_the_run(runs):
    key = lambda r: {k: v for k, v in r.items() if k not in ("tokens_per_s", "time_s")}
    want = [key(r) for r in read_jsonl(runs / "sft2" / "log.jsonl") if r["step"] > 3]
    assert [key(r) for r in read_jsonl(runs / "sft2_resumed" / "log.jsonl")] == want
    a, b = (load_file(runs / d / "step_0000006" / "model.safetensors") for d in ("sft2", "sft2_resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rm_two_ranks_match_one_process(runs):
    assert_close_curves(
        curve(runs / "rm1" / "log.jsonl", ["step", "loss", "grad_norm"]),
        curve(runs / "rm2" / "log.jsonl", ["step", "loss", "grad_norm"]),
    )
    val = ["step", "val_loss", "val_accuracy", "val_margin", "val_acc_k3"]
    assert_close_curves(curve(runs / "rm1" / "log.jsonl", val), curve(runs / "rm2" / "log.jsonl", val))
    assert_same_weights(runs, "rm")


def test_ppo_two_ranks_match_one_process(runs):
    keys = [
        "step",
        "score_mean",
        "score_std",
        "kl",
        "kl_coef",
        "rlhf_reward",
        "pg_loss",
        "v_loss",
        "approx_kl",
        "clipfrac",
        "entropy",
        "explained_variance",
        "response_length",
        "grad_norm",
    ]
    one, two = curve(runs / "ppo1" / "log.jsonl", keys), curve(runs / "ppo2" / "log.jsonl", keys)
    assert len(one) == 3 and one[-1][keys.index("kl")] > 0  # the policy moved away from the reference
    assert_close_curves(one, two)
    assert_same_weights(runs, "ppo")


def test_ppo_sampled_ranks_stay_in_step(runs):
    assert_same_weights(runs, "ppo_sampled")
    kl = [json.loads((runs / f"ppo_sampled_kl_rank{r}.json").read_text()) for r in range(WORLD)]
    assert kl[0] == kl[1] and kl[0] != 0.05  # one global KL drove both controllers
    rows = read_jsonl(runs / "ppo_sampled2" / "log.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["ptx_loss"]) for r in rows)


def test_batches_that_do_not_split_evenly_are_refused(runs):
    for r in range(WORLD):
        assert (
            runs / f"bad_rank{r}.txt"
        ).read_text() == "ppo.minibatch (3) must be a multiple of the number of processes (2)"


def test_one_process_makes_no_process_group():
    assert not dist.active() and (dist.rank(), dist.world_size(), dist.is_main()) == (0, 1, True)
    x, mask = torch.randn(2, 5), torch.rand(2, 5) > 0.3
    assert (
        dist.all_sum(x) is x and dist.shard(8) == slice(0, 8) and dist.mean_floats({"a": 0.1}) == {"a": 0.1}
    )
    mean, var = global_masked_moments(x, mask)
    assert torch.equal(mean, masked_mean(x, mask)) and torch.equal(var, masked_var(x, mask))
    model = GPT(TINY)
    assert dist.wrap(model) is model
    dist.check_divides("train.batch_size", 7)  # any batch splits over one process
