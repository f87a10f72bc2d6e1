"""`python -m fastrlhf pipeline --task T --out runs/NAME [--algo A[,B..]] [--config F] [section.field=value ...]`:
the whole recipe, stage by stage, resumable, with a report (fastrlhf.pipeline). --algo picks the RL stage(s):
ppo (the default), grpo, rloo, reinforce_pp, dpo; stages an algorithm does not need are skipped, and the report
puts every RL stage finished in the run folder side by side on the same held-out prompts."""

from __future__ import annotations

import argparse

from fastrlhf.pipeline.config import ALGOS, STAGES, load_pipeline_config
from fastrlhf.pipeline.run import run_pipeline
from fastrlhf.tasks.registry import task_names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="sentiment", help=f"one of {task_names()} (default: %(default)s)")
    p.add_argument("--out", required=True, help="run folder, e.g. runs/sentiment; an existing run is resumed")
    p.add_argument(
        "--config",
        help="TOML file with [run] [data] [pretrain.*] [sft.*] [label] [rm.*] [ppo.*] [grpo.*] [rloo.*] "
        "[reinforce_pp.*] [eval]",
    )
    p.add_argument(
        "--algo",
        default="ppo",
        help=f"RL algorithm(s), comma-separated, of {list(ALGOS)} (default: %(default)s)",
    )
    p.add_argument(
        "--model",
        help="start from this pretrained model (HF folder, .gguf, smollm2-135m-instruct) instead of pretraining",
    )
    p.add_argument("--until", choices=STAGES, default="eval", help="stop after this stage")
    p.add_argument("--redo", choices=STAGES, default="", help="delete this stage and every later one first")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", help="section.field=value, e.g. ppo.ppo.kl_coef=0.1")


def run(args: argparse.Namespace) -> None:
    overrides = [*args.overrides, *([f"run.model={args.model}"] if args.model else [])]
    cfg = load_pipeline_config(args.task, args.config, overrides)
    algos = tuple(a.strip() for a in args.algo.split(",") if a.strip())
    report = run_pipeline(args.out, cfg, algos=algos, until=args.until, redo=args.redo, quiet=args.quiet)
    print(f"report: {report}")
