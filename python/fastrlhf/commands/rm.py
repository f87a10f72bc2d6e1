"""`python -m fastrlhf rm --config FILE [section.field=value ...]`: step 2 of the recipe, a K-wise reward
model trained on rankings (fastrlhf.train.reward)."""

from __future__ import annotations

import argparse

from fastrlhf.config import load_config
from fastrlhf.train.reward import RMConfig, train_rm


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML file with [optim], [data], [train] tables")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="section.field=value, e.g. data.train=rankings.jsonl")


def run(args: argparse.Namespace) -> None:
    train_rm(load_config(RMConfig, args.config, args.overrides), quiet=args.quiet)
