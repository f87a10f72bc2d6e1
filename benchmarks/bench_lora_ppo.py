"""Peak memory of one PPO step at SmolLM2-135M's shape (random init), LoRA against full fine-tuning, each in a
fresh child process (the whole step: the models it holds, rollout, scoring, update).

- full, value separate: what `ppo` holds by default: policy + its AdamW state, a reference copy, the reward
  model, and a critic copied from the reward model with its own AdamW state.
- full, value on the policy: the same with `ppo.value_model = "policy_head"` (no critic trunk).
- LoRA r16 on every linear, value on the policy: the reference is the policy's base with its adapters off,
  so the base weights are held once beside the reward model; AdamW state for the adapters and the head only.
- LoRA r16, RM on the base: the reward model is LoRA adapters + a scalar head on the policy's own base
  weights (a LoRA RM trained on the SFT model, as `rm` with [lora] writes), the value a head on the policy.
- LoRA r16 everywhere, one base: the same, and a critic copied from the reward model that trains its own
  adapters and head: policy, reference, reward model and critic hold the base once (the critic's own forward
  and backward still keep their activations).

Each child's peak is measured from just before the trainer is built (the models held, the trainer's state
and one step), so the one-off copies of building the models (a reference or reward model loaded, then
shared) do not count.

Validates first: each child's step must keep the sampler == trainer ratio check (first_ratio_dev < 1e-3)
and start at KL 0. Ratio = LoRA / full (lower is better; issue 20's goal: <= 0.5x)."""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time

import torch
from _common import machine
from bench_llama import SMOLLM2, _status_kib
from fastrlhf.config import load_config
from fastrlhf.models.config import LlamaConfig
from fastrlhf.models.heads import ScalarHeadModel
from fastrlhf.models.llama import LlamaForCausalLM
from fastrlhf.models.lora import LoraConfig, add_lora, share_base
from fastrlhf.rl.config import PPOConfig
from fastrlhf.rl.ppo import PPOTrainer

SETUPS = {  # name -> (LoRA, ppo.value_model, the reward model LoRA on the policy's base)
    "full, value separate": (False, "separate", False),
    "full, value on the policy": (False, "policy_head", False),
    "LoRA r16, value on the policy": (True, "policy_head", False),
    "LoRA r16, RM on the base, value on the policy": (True, "policy_head", True),
    "LoRA r16, RM + critic on one base": (True, "separate", True),
}


def reset_peak() -> None:
    """Start the process's peak resident size (VmHWM) afresh from its current size (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(name: str, args) -> None:
    base = _status_kib("VmRSS")  # python, torch and fastrlhf, before any model
    lora, value, one_base = SETUPS[name]
    cfg = LlamaConfig(**{**SMOLLM2, "n_layer": args.layers, "vocab_size": args.vocab})
    torch.manual_seed(0)
    policy = LlamaForCausalLM(cfg)
    reward = ScalarHeadModel.from_gpt(policy) if one_base else ScalarHeadModel(cfg)
    ref = None
    if lora:
        add_lora(policy, LoraConfig(r=16, alpha=32.0))
    else:
        ref = LlamaForCausalLM(cfg)
        ref.load_weights(policy.weights())
    if one_base:
        add_lora(reward.trunk, LoraConfig(r=16, alpha=32.0))
        if not share_base(reward.trunk, policy):
            raise SystemExit("the reward model's base does not match the policy's")
    gc.collect()
    reset_peak()
    with tempfile.TemporaryDirectory() as out:
        overrides = [
            f"ppo.value_model={value}",
            f"ppo.rollout_batch={args.batch}",
            f"ppo.minibatch={args.batch // 2}",
        ]
        overrides += [f"ppo.max_new_tokens={args.new_tokens}", "train.device=cpu", f"train.out_dir={out}"]
        g = torch.Generator().manual_seed(1)
        prompts = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt_len), generator=g).tolist()
        trainer = PPOTrainer(
            load_config(PPOConfig, None, overrides), policy, ref, reward, prompts, quiet=True
        )
        t0 = time.perf_counter()
        m = trainer.step()
        seconds = time.perf_counter() - t0
    peak = (_status_kib("VmHWM") - base) / 1024  # VmHWM: the peak since reset_peak
    print(
        json.dumps(
            {"peak_mib": peak, "step_s": seconds, "first_ratio_dev": m["first_ratio_dev"], "kl": m["kl"]}
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--batch", type=int, default=8, help="rollout batch (prompts per step)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--vocab", type=int, default=SMOLLM2["vocab_size"], help="smaller for a smoke run")
    ap.add_argument("--child", choices=list(SETUPS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args.child, args)
    runs = {}
    for name in SETUPS:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            name,
            "--batch",
            str(args.batch),
            "--layers",
            str(args.layers),
        ]
        cmd += [
            "--prompt-len",
            str(args.prompt_len),
            "--new-tokens",
            str(args.new_tokens),
            "--vocab",
            str(args.vocab),
        ]
        cmd += ["--threads", str(args.threads)] if args.threads else []
        runs[name] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        r = runs[name]
        if not (r["first_ratio_dev"] < 1e-3 and abs(r["kl"]) < 1e-3):
            raise SystemExit(f"validation failed for {name}: {r}")
    print("validated: every setup keeps ratio == 1 at its first minibatch and starts at KL 0")
    lora = runs["LoRA r16, value on the policy"]
    shape = f"L{args.layers} B{args.batch} prompt {args.prompt_len} + {args.new_tokens} new"
    print(
        f"\nPPO step, SmolLM2-135M shape ({shape}): peak memory above the bare process, and the step's time"
    )
    print(f"{'setup':<46} {'peak MiB':>9} {'step s':>7} {'LoRA / this':>12}")
    for name, r in runs.items():
        print(
            f"{name:<46} {r['peak_mib']:>9.0f} {r['step_s']:>7.1f} {lora['peak_mib'] / r['peak_mib']:>11.2f}x"
        )
    full = runs["full, value separate"]
    row = {"bench": "lora_ppo_memory", "shape": shape, "goal": "LoRA <= 0.5x full", **machine()}
    row |= {name: r for name, r in runs.items()} | {
        "lora_over_full": lora["peak_mib"] / full["peak_mib"],
        "one_base_over_full": runs["LoRA r16, RM + critic on one base"]["peak_mib"] / full["peak_mib"],
    }
    print("JSON " + json.dumps(row))


if __name__ == "__main__":
    main()
