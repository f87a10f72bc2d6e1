"""One PPO step end to end (issue 5's shapes): policy, reference, value and reward all GPT-2 shaped
(n_layer 4, n_head 4, n_embd 256, vocab 512); 16 prompts of 32 tokens, 64 new tokens (no EOS, so every
response is 64 long), 1 PPO epoch. Validates first (the trainer's invariants: ratio == 1 and
approx_kl == 0 at the first minibatch, finite metrics), then prints the median step time and its split
(generate / score / train). With TRL installed (or --trl on) it also times TRL's PPOTrainer
(trl.experimental.ppo, TRL 1.12) in this process on the same shapes, weights and thread count, one TRL step
then one of ours, with TRL's split measured the same way; ratio = TRL time / ours.

    .venv/bin/python benchmarks/bench_ppo_step.py --threads 1 [--reps 7] [--trl auto|on|off]"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import statistics
import time

import torch
from _common import report
from fastrlhf.model import GPT, GPTConfig, ScalarHeadModel
from fastrlhf.train.config import load_config
from fastrlhf.train.ppo import PPOTrainer
from fastrlhf.train.ppo_config import PPOConfig

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


def our_trainer(minibatch: int) -> PPOTrainer:
    """Our trainer on the shapes above, validated by one step: the trainer raises if ratio != 1 or
    approx_kl != 0 at minibatch 0; here also finite metrics and full-length responses."""
    cfg = load_config(PPOConfig, None, [f"ppo.rollout_batch={N_PROMPTS}", f"ppo.minibatch={minibatch}",
                                        "ppo.ppo_epochs=1", f"ppo.max_new_tokens={NEW}", "optim.warmup_steps=0",
                                        "train.max_steps=1000"])
    policy, ref, reward, value = models()
    prompts = torch.randint(0, VOCAB, (N_PROMPTS, PROMPT_LEN), generator=torch.Generator().manual_seed(1)).tolist()
    trainer = PPOTrainer(cfg, policy, ref, reward, prompts, value_model=value, eos_token_id=None, quiet=True)
    first = trainer.step()
    assert all(math.isfinite(v) for k, v in first.items() if k != "ptx_loss"), first
    assert first["response_length"] == NEW
    assert first["first_ratio_dev"] < 1e-5 and abs(first["first_approx_kl"]) < 1e-5, first
    print(f"validated: metrics finite; first minibatch max |ratio - 1| {first['first_ratio_dev']:.1e}, "
          f"approx_kl {first['first_approx_kl']:.1e}")
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
    ap.add_argument("--trl", choices=("auto", "on", "off"), default="auto",
                    help="time TRL's PPOTrainer too (auto: when trl is installed; on: fail without it)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    minibatch, t0 = 8, time.perf_counter()
    trainer = our_trainer(minibatch)
    runs: list[dict[str, float]] = []
    base: dict[str, float] = {k: math.nan for k in ("total", *SPLIT)}
    if args.trl != "off":
        try:  # each TRL step is followed by one of ours (off TRL's clock): load hits both alike
            from bench_ppo_trl import time_trl  # kept apart: imports TRL, which most installs lack

            base = time_trl(models, N_PROMPTS, PROMPT_LEN, NEW, VOCAB, minibatch, args.reps,
                            between=lambda: runs.append(trainer.step()))
        except (ImportError, importlib.metadata.PackageNotFoundError) as exc:
            if args.trl == "on":
                raise
            print(f"TRL comparison skipped: {exc}")
    runs = runs[1:] or [trainer.step() for _ in range(args.reps)]  # the first one ran after TRL's warm-up step
    ours = split_ms(runs)
    print(f"\nPPO step split, ms (medians of {len(runs)}; threads {torch.get_num_threads()})")
    print(f"{'':<6} {'total':>8} {'generate':>9} {'score':>8} {'train':>8} {'other':>8}")
    for name, d in (("ours", ours), ("TRL", base)):
        print(f"{name:<6} {d['total']:>8.0f} {d['generate']:>9.0f} {d['score']:>8.0f} {d['train']:>8.0f} "
              f"{d.get('other', 0.0):>8.0f}")
    print("ratio  " + "  ".join(f"{k} {base[k] / ours[k]:.2f}x" for k in ("total", *SPLIT)))
    report("PPO step (policy/ref/value/reward L4 H4 C256 V512; 16 x 32 prompt tokens, 64 new, 1 epoch, minibatch 8)",
           [dict(op="ppo step", shape=f"B{N_PROMPTS} Tp{PROMPT_LEN} Tr{NEW}", baseline="TRL 1.12 PPOTrainer",
                 base_ms=base["total"], ours_ms=ours["total"], goal=">= 3x",
                 **{f"{k}_ms": v for k, v in ours.items() if k != "total"},
                 **{f"trl_{k}_ms": v for k, v in base.items() if k != "total"})])
    print(f"(bench wall time {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
