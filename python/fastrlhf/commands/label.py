"""`python -m fastrlhf label --sft RUN --prompts TASK|FILE --k K --labeler NAME --out rankings.jsonl`:
sample K answers per prompt from an SFT model and rank them (fastrlhf.labeling). Every ranking is appended
to --out the moment it is made, and a rerun resumes: prompts already in --out are not asked again."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastrlhf.commands.label_server import add_web_arguments, label_sampled
from fastrlhf.labeling.answers import label_to_file, task_or_file_prompts


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sft", required=True, help="SFT checkpoint or run folder")
    p.add_argument(
        "--prompts", required=True, help="a task name (arithmetic, sentiment, tone) or a prompts file"
    )
    p.add_argument("--k", type=int, default=4, help="answers per prompt (K >= 2; default: %(default)s)")
    p.add_argument(
        "--labeler",
        help="a task's name (its scripted labeler), terminal, jsonl or web (default: the task's)",
    )
    p.add_argument("--labeler-file", help="rankings JSONL the jsonl labeler reads")
    p.add_argument("--out", required=True, help="rankings JSONL to append to (resumed if it exists)")
    p.add_argument("--split", choices=("train", "heldout"), default="train", help="task prompts to use")
    p.add_argument("--limit", type=int, default=0, help="use only the first N prompts (0 = all)")
    p.add_argument("--corpus", default="", help="sentiment: corpus text file (default: Shakespeare)")
    p.add_argument("--batch-prompts", type=int, default=16, help="prompts sampled together (x K rows)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    add_web_arguments(p.add_argument_group("--labeler web (people rank in the browser)"))


def run(args: argparse.Namespace) -> None:
    from fastrlhf.labeling.labelers import make_labeler
    from fastrlhf.models.load import load_model

    if args.k < 2:
        raise ValueError(f"--k must be >= 2 (a ranking needs two answers); got {args.k}")
    if args.batch_prompts < 1 or args.max_new_tokens < 1 or args.limit < 0:
        raise ValueError("--batch-prompts and --max-new-tokens must be >= 1 and --limit >= 0")
    if Path(args.out).is_dir():
        raise ValueError(
            f"--out {args.out} is a directory; give the rankings file to write (e.g. rankings.jsonl)"
        )
    if args.temperature == 0:
        print(
            "warning: --temperature 0 samples greedily: a prompt's K answers are identical, every ranking a tie",
            file=sys.stderr,
        )
    prompts, task_labeler = task_or_file_prompts(args.prompts, args.split, args.corpus)
    name = args.labeler or task_labeler
    if name is None:
        raise ValueError("--labeler is required when --prompts is a file")
    if name == "jsonl" and not args.labeler_file:
        raise ValueError("--labeler jsonl reads its rankings from --labeler-file: give that file")
    kwargs = {"path": args.labeler_file} if name == "jsonl" else {}
    labeler = None if name == "web" else make_labeler(name, **kwargs)
    prompts = prompts[: args.limit] if args.limit else prompts
    model, tok = load_model(args.sft)
    if tok is None:
        raise ValueError(f"{args.sft} has no tokenizer/ folder")
    if labeler is None:  # people rank in the browser (fastrlhf.labeling.web)
        return label_sampled(args, model, tok, prompts)
    stats, skipped = label_to_file(
        model,
        tok,
        prompts,
        labeler,
        args.out,
        k=args.k,
        batch_prompts=args.batch_prompts,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
    )
    print(
        f"{stats.labeled} prompts ranked, {stats.skipped} already in {args.out}, {skipped} skipped (an answer "
        f"stayed empty), {stats.undone} undone"
        + (", quit early" if stats.quit else "")
        + f"; {stats.total} rankings in {args.out}"
    )
