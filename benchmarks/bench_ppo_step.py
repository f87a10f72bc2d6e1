"""One PPO step end to end (issue 5's shapes): policy, reference, value and reward all GPT-2 shaped
(n_layer 4, n_head 4, n_embd 256, vocab 512); 16 prompts of 32 tokens, 64 new tokens (no EOS, so every
response is 64 long), 1 PPO epoch. Validates first (the trainer's invariants: ratio == 1 and
approx_kl == 0 at the first minibatch, finite metrics), then prints the median step time and its split
(generate / score / train). With TRL installed (or --trl on) it also times TRL's PPOTrainer
(trl.experimental.ppo, TRL 1.12) in this process on the same shapes, weights and thread count, one TRL step
then one of ours, with TRL's split measured the same way; ratio = TRL time / ours. Ours runs with both
ppo.value_model settings by default: 'separate' (the issue's default and TRL's layout: the value model has
its own trunk) is the headline, 'policy_head' (a value head on the policy's trunk) a second row.

    .venv/bin/python benchmarks/bench_ppo_step.py --threads 1 [--reps 7] [--trl auto|on|off]
        [--value-model both|separate|policy_head]"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import statistics
import time

import torch
from _common import report
from fastrlhf.config import load_config
from fastrlhf.models import GPT, GPTConfig, ScalarHeadModel
from fastrlhf.rl.config import PPOConfig
from fastrlhf.rl.ppo import PPOTrainer

VOCAB, N_PROMPTS, PROMPT_LEN, NEW = 512, 16, 32, 64


def models(seed: int = 0):
    cfg = GPTConfig(vocab_size=VOCAB, block_size=PROMPT_LEN + NEW, n_layer=4, n_head=4, n_embd=256)
    torch.manual_seed(seed)
    policy, reward = GPT(cfg), ScalarHeadModel(cfg)
    ref = GPT(cfg)
    ref.load_weights(policy.weights())
    value = ScalarHeadModel.from_gpt(policy)
    value.head.load_state_dict(reward.head.state_dict())
    return policy, ref, reward, value


SPLIT = ("generate", "score", "train")


def our_trainer(minibatch: int, value_model: str) -> PPOTrainer:
    """Our trainer on the shapes above, validated by one step: the trainer raises if ratio != 1 or
    approx_kl != 0 at minibatch 0; here also finite metrics and full-length responses."""
    cfg = load_config(
        PPOConfig,
        None,
        [
            f"ppo.rollout_batch={N_PROMPTS}",
            f"ppo.minibatch={minibatch}",
            "ppo.ppo_epochs=1",
            f"ppo.max_new_tokens={NEW}",
            "optim.warmup_steps=0",
            "train.max_steps=1000",
            f"ppo.value_model={value_model}",
        ],
    )
    policy, ref, reward, value = models()
    prompts = torch.randint(
        0, VOCAB, (N_PROMPTS, PROMPT_LEN), generator=torch.Generator().manual_seed(1)
    ).tolist()
    trainer = PPOTrainer(
        cfg,
        policy,
        ref,
        reward,
        prompts,
        value_model=value if value_model == "separate" else None,
        eos_token_id=None,
        quiet=True,
    )
    first = trainer.step()
    assert all(math.isfinite(v) for k, v in first.items() if k != "ptx_loss"), first
    assert first["response_length"] == NEW
    assert first["first_ratio_dev"] < 1e-5 and abs(first["first_approx_kl"]) < 1e-5, first
    print(
        f"validated ({value_model}): metrics finite; first minibatch max |ratio - 1| {first['first_ratio_dev']:.1e}, "
        f"approx_kl {first['first_approx_kl']:.1e}"
    )
    return trainer


def split_ms(runs: list[dict[str, float]]) -> dict[str, float]:
    """Medians in ms of our steps' total and its generate / score / train parts."""
    out = {k: statistics.median(r[f"time_{k}"] for r in runs) * 1e3 for k in SPLIT}
    out["total"] = statistics.median(sum(r[f"time_{k}"] for k in SPLIT) for r in runs) * 1e3
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    ap.add_argument("--reps", type=int, default=7, help="timed steps per side; medians are reported")
    ap.add_argument(
        "--trl",
        choices=("auto", "on", "off"),
        default="auto",
        help="time TRL's PPOTrainer too (auto: when trl is installed; on: fail without it)",
    )
    ap.add_argument(
        "--value-model",
        choices=("both", "separate", "policy_head"),
        default="both",
        help="our ppo.value_model setting(s); 'both' alternates them step by step",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    minibatch, t0 = 8, time.perf_counter()
    kinds = ("separate", "policy_head") if args.value_model == "both" else (args.value_model,)
    trainers = {k: our_trainer(minibatch, k) for k in kinds}
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}

    def ours_once() -> None:
        for k, tr in trainers.items():
            runs[k].append(tr.step())

    base: dict[str, float] = {k: math.nan for k in ("total", *SPLIT)}
    if args.trl != "off":
        try:  # each TRL step is followed by one of ours (off TRL's clock): load hits both alike
            from bench_ppo_trl import time_trl  # kept apart: imports TRL, which most installs lack

            base = time_trl(
                models, N_PROMPTS, PROMPT_LEN, NEW, VOCAB, minibatch, args.reps, between=ours_once
            )
        except (ImportError, importlib.metadata.PackageNotFoundError) as exc:
            if args.trl == "on":
                raise
            print(f"TRL comparison skipped: {exc}")
    if not runs[kinds[0]]:
        for _ in range(args.reps + 1):
            ours_once()
    ours = {k: split_ms(r[1:]) for k, r in runs.items()}  # the first ones ran after TRL's warm-up step
    n = len(runs[kinds[0]]) - 1
    print(f"\nPPO step split, ms (medians of {n}; threads {torch.get_num_threads()})")
    print(f"{'':<18} {'total':>8} {'generate':>9} {'score':>8} {'train':>8} {'other':>8}  ratio (TRL / ours)")
    for name, d in [*((f"ours {k}", v) for k, v in ours.items()), ("TRL 1.12", base)]:
        ratio = (
            ""
            if name.startswith("TRL")
            else "  ".join(f"{k} {base[k] / d[k]:.2f}x" for k in ("total", *SPLIT))
        )
        print(
            f"{name:<18} {d['total']:>8.0f} {d['generate']:>9.0f} {d['score']:>8.0f} {d['train']:>8.0f} "
            f"{d.get('other', 0.0):>8.0f}  {ratio}"
        )
    report(
        "PPO step (policy/ref/value/reward L4 H4 C256 V512; 16 x 32 prompt tokens, 64 new, 1 epoch, minibatch 8)",
        [
            dict(
                op=f"ppo step ({k})",
                shape=f"B{N_PROMPTS} Tp{PROMPT_LEN} Tr{NEW}",
                baseline="TRL 1.12 PPOTrainer",
                base_ms=base["total"],
                ours_ms=d["total"],
                goal=">= 3x" if k == "separate" else "",
                **{f"{p}_ms": v for p, v in d.items() if p != "total"},
                **{f"trl_{p}_ms": v for p, v in base.items() if p != "total"},
            )
            for k, d in ours.items()
        ],
    )
    print(f"(bench wall time {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
