"""`python -m fastrlhf chat PATH [--compare OTHER]`: talk to a model (an HF folder, a GGUF file, a run or
stage folder, or 'smollm2-135m-instruct') with its chat template, tokens printed as they are sampled.
/reset starts a new conversation, /quit (or end of input) leaves. --compare answers every message with a
second model too (say the SFT model beside the aligned one), each keeping its own conversation."""

from __future__ import annotations

import argparse
import sys

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="HF folder, .gguf file, fastrlhf run/stage folder, or smollm2-135m-instruct")
    p.add_argument("--compare", help="a second model answering the same messages")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--system", default="", help="a system message opening each conversation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="weights for sampling: bf16 reads half the bytes a token (faster on GPUs and on CPUs with "
        "AVX512-BF16 or AMX, far slower on AVX2-only CPUs)",
    )


def run(args: argparse.Namespace) -> None:
    from fastrlhf import from_pretrained, load_tokenizer
    from fastrlhf.models.chat import Chat
    from fastrlhf.models.generate import sampling_dtype

    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ValueError("--max-new-tokens must be >= 1, --temperature >= 0 and --top-p in (0, 1]")
    names = [args.model] + ([args.compare] if args.compare else [])
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    chats = [
        Chat(
            from_pretrained(n, dtype=sampling_dtype(args.dtype)),
            load_tokenizer(n),
            system=args.system,
            max_new_tokens=args.max_new_tokens,
            generator=torch.Generator().manual_seed(args.seed),
            **sampling,
        )
        for n in names
    ]
    print(f"chatting with {' and '.join(names)}; /reset starts over, /quit leaves", flush=True)
    for line in sys.stdin if not sys.stdin.isatty() else iter(lambda: input("> "), None):
        text = line.strip()
        if text == "/quit":
            break
        if text == "/reset":
            for c in chats:
                c.reset()
            print("(new conversation)", flush=True)
            continue
        if not text:
            continue
        for name, c in zip(names, chats):
            if len(chats) > 1:
                print(f"[{name}] ", end="", flush=True)
            c.say(text, stream=lambda piece: print(piece, end="", flush=True))
            print(flush=True)
