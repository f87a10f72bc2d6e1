"""`python -m fastrlhf generate`: completions from a checkpoint for prompts given inline or in a file."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="*", help="prompt texts (or use --file)")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a run or checkpoint folder (its latest), an HF folder, a .gguf file, or smollm2-135m-instruct",
    )
    p.add_argument("--file", help="a text file with one prompt per line ('-' = stdin)")
    p.add_argument(
        "--chat",
        action="store_true",
        help="format each prompt as a user turn (the model's chat template, else the Prompt:/Response: format)",
    )
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1, help="completions per prompt")
    p.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="weights for sampling: bf16 reads half the bytes a token (faster on GPUs and on CPUs with "
        "AVX512-BF16 or AMX, far slower on AVX2-only CPUs)",
    )


def run(args: argparse.Namespace) -> None:
    import torch

    from fastrlhf import from_pretrained, load_tokenizer
    from fastrlhf.data import decode_response, encode_prompt
    from fastrlhf.data.prompts import read_prompts
    from fastrlhf.models import generate
    from fastrlhf.models.generate import sampling_dtype

    prompts = list(args.prompts)
    if args.file == "-":
        prompts += [line.rstrip("\n").replace("\\n", "\n") for line in sys.stdin if line.strip()]
    elif args.file:
        prompts += read_prompts(args.file, "--file")
    if not prompts:
        raise ValueError("give at least one prompt (arguments or --file)")
    if args.num_samples < 1 or args.max_new_tokens < 1:
        raise ValueError(
            f"--num-samples and --max-new-tokens must be >= 1; got {args.num_samples}, {args.max_new_tokens}"
        )
    model, tok = (
        from_pretrained(args.checkpoint, dtype=sampling_dtype(args.dtype)),
        load_tokenizer(args.checkpoint),
    )
    texts = [p for p in prompts for _ in range(args.num_samples)]
    ids = [encode_prompt(tok, t) if args.chat else tok.encode(t) for t in texts]  # the model sees decode(ids)
    room = model.config.block_size - max(map(len, ids))
    g = generate(
        model,
        ids,
        min(args.max_new_tokens, room),
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        eos_token_id=tok.eot_id,
        generator=torch.Generator().manual_seed(args.seed),
    )
    for text, row, mask in zip(map(tok.decode, ids), g.responses.tolist(), g.response_mask.tolist()):
        kept = [t for t, m in zip(row, mask) if m]
        completion = (
            decode_response(tok, kept) if args.chat else tok.decode([t for t in kept if t != tok.eot_id])
        )
        print(f"=== {text!r}\n{completion}\n")
