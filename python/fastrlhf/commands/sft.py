"""`python -m fastrlhf sft --config FILE [section.field=value ...]`: step 1 of the recipe, supervised
fine-tuning on demonstrations (packed, response-only loss; fastrlhf.train.sft)."""

from __future__ import annotations

import argparse

from fastrlhf.config import load_config
from fastrlhf.train.sft import SFTConfig, sft


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML file with [model], [optim], [data], [train] tables")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="section.field=value, e.g. data.source=sft.jsonl")


def run(args: argparse.Namespace) -> None:
    sft(load_config(SFTConfig, args.config, args.overrides), quiet=args.quiet)
