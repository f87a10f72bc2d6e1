"""`python -m fastrlhf data`: text files (default: Shakespeare, fetched once) -> tokenizer + token files."""

from __future__ import annotations

import argparse

from fastrlhf.data import corpus


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "files", nargs="*", help="UTF-8 text files, one document each (default: Shakespeare's works)"
    )
    p.add_argument("--out", default="data/shakespeare", help="output folder (default: %(default)s)")
    p.add_argument(
        "--tokenizer",
        choices=("bpe", "gpt2"),
        default="bpe",
        help="train a byte-level BPE on the corpus, or use GPT-2's (default: %(default)s)",
    )
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (default: %(default)s)")
    p.add_argument(
        "--val-fraction", type=float, default=0.1, help="tail of the stream held out (default: %(default)s)"
    )
    p.add_argument(
        "--cache", default=None, help="download cache (default: $FASTRLHF_CACHE or ~/.cache/fastrlhf)"
    )


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    paths = args.files or corpus.fetch_shakespeare(Path(args.cache) if args.cache else None)
    docs = corpus.read_texts(paths)
    tok = corpus.build_tokenizer(args.tokenizer, docs, args.vocab_size)
    meta = corpus.prepare(docs, tok, args.out, args.val_fraction)
    print(
        f"{meta['documents']} documents, {meta['characters']:,} characters -> {meta['tokens']:,} tokens "
        f"({meta['train_tokens']:,} train / {meta['val_tokens']:,} val), vocab {meta['vocab_size']} "
        f"({meta['tokenizer']}), written to {args.out}"
    )
