"""`python -m fastrlhf rloo --config FILE [section.field=value ...]`: RLOO, REINFORCE leave-one-out (fastrlhf.rl.rloo)
from any model, on a task's exact scorer, a reward model, a Python function or several weighted. Resumes
from out_dir."""

from __future__ import annotations

import argparse

from fastrlhf.config import load_config
from fastrlhf.rl.build import build_critic_free
from fastrlhf.rl.rloo import RLOOConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML file with policy and [rloo], [optim], [train] tables")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="section.field=value, e.g. rloo.kl_coef=0.02")


def run(args: argparse.Namespace) -> None:
    build_critic_free(load_config(RLOOConfig, args.config, args.overrides), quiet=args.quiet).train()
