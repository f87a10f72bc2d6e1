"""`python -m fastrlhf ppo --config FILE [section.field=value ...]`: step 3 of the recipe, PPO with PPO-ptx
from an SFT and a reward-model checkpoint (InstructGPT section 3.5; fastrlhf.rl)."""

from __future__ import annotations

import argparse

from fastrlhf.config import load_config
from fastrlhf.rl.build import build_trainer
from fastrlhf.rl.config import PPOConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML file with [models], [ppo], [optim], [train] tables")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="section.field=value, e.g. ppo.kl_coef=0.1")


def run(args: argparse.Namespace) -> None:
    cfg = load_config(PPOConfig, args.config, args.overrides)
    build_trainer(cfg, quiet=args.quiet).train()
