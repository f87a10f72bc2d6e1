"""`python -m fastrlhf convert SRC OUT`: any model fastrlhf reads (a GGUF file, an HF folder, a fastrlhf run
or stage folder, 'smollm2-135m-instruct') written as a Hugging Face folder (config.json, safetensors,
generation_config.json and the tokenizer's files) that transformers.AutoModelForCausalLM loads."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "src", help="a .gguf file, an HF folder, a fastrlhf run/stage folder, or smollm2-135m-instruct"
    )
    p.add_argument("out", help="the folder to write")


def run(args: argparse.Namespace) -> None:
    from fastrlhf import from_pretrained, load_tokenizer

    model = from_pretrained(args.src)
    out = model.save_pretrained(args.out, load_tokenizer(args.src))
    print(f"{type(model).__name__}, {model.num_params():,} parameters -> {out}")
