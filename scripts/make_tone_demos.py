"""Make python/fastrlhf/tasks/tone_demos.jsonl: SmolLM2-135M-Instruct's own answers to the tone task's train
prompts, each topic's first sampled answer that has the wanted form (one sentence of 6-30 words that ends
the turn, no preamble, quote, list or colon). Tone plays no part in the choice, so SFT on them keeps the base
model's tone. Run: .venv/bin/python scripts/make_tone_demos.py [--out FILE] (about 4 minutes on 2 cores)."""

from __future__ import annotations

import argparse
import json
import re

import torch
from fastrlhf import from_pretrained, load_tokenizer
from fastrlhf.data.chat import encode_prompt
from fastrlhf.models.generate import generate
from fastrlhf.tasks.tone import HERE, held_out, prompt_for, topics

PREAMBLE = re.compile(r"^(here|sure|certainly|okay|ok|of course|as an ai)\b", re.IGNORECASE)


def has_form(text: str) -> bool:
    """One sentence of 6-30 words, ending in . ! or ?, with no preamble, quote, list or colon."""
    words = text.split()
    ends = re.findall(r"[.!?](\s|$)", text)
    return (
        6 <= len(words) <= 30
        and text[-1:] in ".!?"
        and len(ends) == 1
        and not any(c in text for c in ':"\n*#')
        and not PREAMBLE.match(text)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--out", default=str(HERE / "tone_demos.jsonl"))
    ap.add_argument("--tries", type=int, default=4, help="answers sampled per topic")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model, tok = from_pretrained(args.model), load_tokenizer(args.model)
    train = [t for t in topics() if not held_out(t)]
    g = torch.Generator().manual_seed(args.seed)
    kept: dict[str, str] = {}
    for start in range(0, len(train), 8):
        chunk = train[start : start + 8]
        rows = [encode_prompt(tok, prompt_for(t)) for t in chunk for _ in range(args.tries)]
        gen = generate(model, rows, 64, temperature=0.7, top_p=0.9, eos_token_id=tok.eot_id, generator=g)
        for i, (resp, mask) in enumerate(zip(gen.responses.tolist(), gen.response_mask.tolist())):
            ids = [t for t, m in zip(resp, mask) if m]
            topic = chunk[i // args.tries]
            if topic in kept or not ids or ids[-1] != tok.eot_id:
                continue
            text = tok.decode(ids[:-1]).strip()
            if has_form(text):
                kept[topic] = text
        print(f"{start + len(chunk)}/{len(train)} topics, {len(kept)} kept", flush=True)
    with open(args.out, "w") as f:
        f.writelines(json.dumps({"topic": t, "response": kept[t]}) + "\n" for t in train if t in kept)
    print(f"wrote {len(kept)} demonstrations to {args.out}")


if __name__ == "__main__":
    main()
