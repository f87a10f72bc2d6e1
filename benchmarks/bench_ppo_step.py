"""One PPO step end to end (issue 5's shapes): policy, reference, value and reward all GPT-2 shaped
(n_layer 4, n_head 4, n_embd 256, vocab 512); 16 prompts of 32 tokens, 64 new tokens (no EOS, so every
response is 64 long), 1 PPO epoch. Validates first (the trainer's invariants: ratio == 1 and
approx_kl == 0 at the first minibatch, finite metrics), then prints the median step time and its split
(generate / score / train). When TRL is installed it also times TRL's PPOTrainer (trl.experimental.ppo, TRL 1.12)
on the same shapes, weights and thread count; ratio = TRL time / ours."""

from __future__ import annotations

import importlib.metadata
import math
import statistics
import time

import torch
from _common import parse_args, report
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


def ours(args, minibatch: int) -> tuple[float, dict[str, float]]:
    cfg = load_config(PPOConfig, None, [f"ppo.rollout_batch={N_PROMPTS}", f"ppo.minibatch={minibatch}",
                                        "ppo.ppo_epochs=1", f"ppo.max_new_tokens={NEW}", "optim.warmup_steps=0",
                                        "train.max_steps=1000"])
    policy, ref, reward, value = models()
    prompts = torch.randint(0, VOCAB, (N_PROMPTS, PROMPT_LEN), generator=torch.Generator().manual_seed(1)).tolist()
    trainer = PPOTrainer(cfg, policy, ref, reward, prompts, value_model=value, eos_token_id=None, quiet=True)
    first = trainer.step()  # validates: the trainer raises if ratio != 1 or approx_kl != 0 at minibatch 0
    assert all(math.isfinite(v) for k, v in first.items() if k != "ptx_loss"), first
    assert first["response_length"] == NEW
    assert first["first_ratio_dev"] < 1e-5 and abs(first["first_approx_kl"]) < 1e-5, first
    print(f"validated: metrics finite; first minibatch max |ratio - 1| {first['first_ratio_dev']:.1e}, "
          f"approx_kl {first['first_approx_kl']:.1e}")
    runs = [trainer.step() for _ in range(args.reps)]
    split = {k: statistics.median(r[k] for r in runs) * 1e3 for k in ("time_generate", "time_score", "time_train")}
    total = statistics.median(sum(r[k] for k in ("time_generate", "time_score", "time_train")) for r in runs) * 1e3
    return total, split


def trl_step_ms(args, minibatch: int) -> float:
    """Median ms of one TRL PPO update (batch 16, same shapes and weights); needs trl, accelerate, datasets."""
    from bench_ppo_trl import time_trl  # kept apart: imports TRL, which most installs lack

    return time_trl(models, N_PROMPTS, PROMPT_LEN, NEW, VOCAB, minibatch, args.reps)


def main() -> None:
    ap_args = parse_args(__doc__.split("\n")[0])
    minibatch = 8
    t0 = time.perf_counter()
    total, split = ours(ap_args, minibatch)
    print(f"\nours: PPO step {total:.0f} ms = generate {split['time_generate']:.0f} + score {split['time_score']:.0f}"
          f" + train {split['time_train']:.0f} ms (medians of {ap_args.reps}; threads {torch.get_num_threads()})")
    try:
        base = trl_step_ms(ap_args, minibatch)
    except (ImportError, importlib.metadata.PackageNotFoundError) as exc:
        print(f"TRL comparison skipped: {exc}")
        base = math.nan
    report("PPO step (policy/ref/value/reward L4 H4 C256 V512; 16 x 32 prompt tokens, 64 new, 1 epoch, minibatch 8)",
           [dict(op="ppo step", shape=f"B{N_PROMPTS} Tp{PROMPT_LEN} Tr{NEW}", baseline="TRL 1.12 PPOTrainer",
                 base_ms=base, ours_ms=total, goal=">= 3x", **{f"{k}_ms": v for k, v in split.items()})])
    print(f"(bench wall time {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
