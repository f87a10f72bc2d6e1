"""`python -m fastrlhf label-agreement DIR`: per-labeler counts and pairwise agreement (the fraction of
answer pairs two labelers order the same way on the prompts both ranked) from a folder of per-labeler
files written by the web labeler (`label --labeler web` or `label-server`: <out>.labels/)."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="folder of per-labeler files (<name>.jsonl)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")


def run(args: argparse.Namespace) -> None:
    from fastrlhf.labeling.web.agreement import agreement, format_agreement
    from fastrlhf.labeling.web.labels import read_labels_dir

    labels = read_labels_dir(args.dir)
    if not labels:
        raise ValueError(f"{args.dir} holds no per-labeler files (<name>.jsonl)")
    ag = agreement(labels)
    if not args.json:
        print(format_agreement(ag))
        return
    pairs = [
        {"labelers": [a, b], "shared_prompts": n, "same": s, "compared": t, "agreement": s / t if t else None}
        for (a, b), (n, s, t) in ag.pairs.items()
    ]
    same, total = ag.overall()
    print(json.dumps({"labelers": ag.counts, "pairs": pairs, "agreement": same / total if total else None}))
