"""`python -m fastrlhf <command>`. A command is a module with add_arguments(parser) and run(args),
listed in COMMANDS; it is imported only when chosen, so `--help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("fastrlhf.commands.data", "fetch/read text, train a tokenizer, write train/val token files"),
    "pretrain": ("fastrlhf.commands.pretrain", "next-token pretraining from a TOML config"),
    "generate": ("fastrlhf.commands.generate", "sample completions from a checkpoint"),
    "chat": ("fastrlhf.commands.chat", "talk to a model with its chat template, tokens streamed"),
    "convert": ("fastrlhf.commands.convert", "write a GGUF file, HF folder or run as a Hugging Face folder"),
    "sft": ("fastrlhf.commands.sft", "supervised fine-tuning on demonstrations (packed, response-only loss)"),
    "label": ("fastrlhf.commands.label", "sample K answers per prompt from an SFT model and rank them"),
    "label-server": ("fastrlhf.commands.label_server", "serve sampled answers to labelers in the browser"),
    "label-agreement": ("fastrlhf.commands.label_agreement", "counts and pairwise agreement of web labelers"),
    "rm": ("fastrlhf.commands.rm", "train a K-wise reward model on rankings"),
    "ppo": ("fastrlhf.commands.ppo", "PPO (with PPO-ptx) from SFT and reward-model checkpoints"),
    "grpo": (
        "fastrlhf.commands.grpo",
        "GRPO (Dr. GRPO, DAPO options): critic-free RL on a task's scorer or an RM",
    ),
    "dpo": ("fastrlhf.commands.dpo", "DPO / IPO / Plackett-Luce on K-wise rankings, from any model"),
    "rloo": ("fastrlhf.commands.rloo", "RLOO: critic-free RL with a leave-one-out baseline"),
    "reinforce_pp": (
        "fastrlhf.commands.reinforce_pp",
        "REINFORCE++: critic-free RL, batch-normalised returns",
    ),
    "pipeline": (
        "fastrlhf.commands.pipeline",
        "the whole recipe: data, pretrain, SFT, label, RM, PPO, eval, report",
    ),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m fastrlhf", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints usage (or the help) and exits
    module = importlib.import_module(COMMANDS[argv[0]][0])
    cmd = argparse.ArgumentParser(prog=f"python -m fastrlhf {argv[0]}", description=module.__doc__)
    module.add_arguments(cmd)
    args, extra = cmd.parse_known_args(argv[1:])
    if extra and hasattr(args, "overrides"):
        args.overrides += extra  # --section.field=value overrides
    elif extra:
        cmd.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        module.run(args)
    except (ValueError, OSError, RuntimeError) as exc:  # OSError: a full disk, a read-only or missing path
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C; a trainer checkpoints first and says where (train/guard.py)
        print(f"{exc or 'interrupted'}", file=sys.stderr)
        return 130
    finally:
        dist = sys.modules.get("fastrlhf.train.dist")  # a command run under torchrun leaves its process group
        if dist is not None:
            dist.cleanup()
    return 0
