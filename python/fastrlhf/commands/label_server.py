"""`python -m fastrlhf label-server --answers answers.jsonl --out rankings.jsonl`: serve answers sampled
earlier (JSONL: {"id"?, "prompt", "responses"}) to a team of labelers in the browser (fastrlhf.labeling.web).

Prints the URL with its token; open it, give your name, rank. One file per labeler goes to --labels
(default: --out with the suffix .labels), and --out holds every ranking (the reward model's input). Stop
with Ctrl-C and run the same command again to resume: nothing is lost and nothing is asked twice."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_web_arguments(p: argparse.ArgumentParser) -> None:
    """The serving options, shared with `label --labeler web`."""
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine)"
    )
    p.add_argument("--port", type=int, default=0, help="port (default: 0, a free one)")
    p.add_argument(
        "--labels-per-prompt",
        type=int,
        default=1,
        help="different labelers per prompt (default: %(default)s)",
    )
    p.add_argument("--labels", help="folder of per-labeler files (default: --out with the suffix .labels)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--answers", required=True, help="answers JSONL: prompt, K responses and an optional id")
    p.add_argument("--out", required=True, help="merged rankings JSONL (written by the server; resumed)")
    add_web_arguments(p)


def run(args: argparse.Namespace) -> None:
    from fastrlhf.labeling.web.answers import read_answers
    from fastrlhf.labeling.web.server import label_in_browser

    if args.labels_per_prompt < 1:
        raise ValueError(f"--labels-per-prompt must be >= 1; got {args.labels_per_prompt}")
    label_in_browser(
        read_answers(args.answers),
        args.out,
        labels_dir=args.labels,
        labels_per_prompt=args.labels_per_prompt,
        host=args.host,
        port=args.port,
    )


def label_sampled(args: argparse.Namespace, model, tok, prompts: list[str]) -> None:
    """--labeler web: sample every prompt's answers first (to --out with the suffix .answers.jsonl), then
    serve them to people in the browser (fastrlhf.labeling.web)."""
    from fastrlhf.labeling.web.answers import sample_answers_file
    from fastrlhf.labeling.web.server import label_in_browser

    if args.labels_per_prompt < 1:
        raise ValueError(f"--labels-per-prompt must be >= 1; got {args.labels_per_prompt}")
    answers = Path(args.out).with_suffix(".answers.jsonl")
    items, empty = sample_answers_file(
        model,
        tok,
        prompts,
        answers,
        k=args.k,
        batch_prompts=args.batch_prompts,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        progress=True,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
    )
    print(f"{len(items)} prompts' answers in {answers} ({empty} left out: an answer stayed empty)")
    label_in_browser(
        items,
        args.out,
        labels_dir=args.labels,
        labels_per_prompt=args.labels_per_prompt,
        host=args.host,
        port=args.port,
    )
