"""`python -m fastrlhf dpo --config FILE [section.field=value ...]`: DPO, IPO or the listwise Plackett-Luce
loss on the label stage's K-wise rankings, from any model (fastrlhf.train.dpo). Resumes from out_dir."""

from __future__ import annotations

import argparse

from fastrlhf.config import load_config
from fastrlhf.train.dpo import DPOConfig, dpo


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML file with policy and [dpo], [optim], [data], [train] tables")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="section.field=value, e.g. dpo.loss=plackett_luce")


def run(args: argparse.Namespace) -> None:
    dpo(load_config(DPOConfig, args.config, args.overrides), quiet=args.quiet)
