"""`python -m fastrlhf pretrain --config FILE [section.field=value ...]`: step 0 of the recipe, next-token
pretraining of a GPT from a TOML config (fastrlhf.train.pretrain)."""

from __future__ import annotations

import argparse

from fastrlhf.config import load_config
from fastrlhf.train.pretrain import PretrainConfig, pretrain


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML file with [model], [optim], [train] tables")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="section.field=value, e.g. train.max_steps=200")


def run(args: argparse.Namespace) -> None:
    pretrain(load_config(PretrainConfig, args.config, args.overrides), quiet=args.quiet)
