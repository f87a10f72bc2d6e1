"""Sampling: the fused sort-free kernel vs sort-based sampling as HF transformers does it."""

from __future__ import annotations

import torch
from _common import assert_close, median_ms, parse_args, report
from fastrlhf.ops import reference, sample


def hf_sample(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """The baseline, as HF's logits warpers + generate() do it: scale, top-k mask, ascending sort, softmax,
    cumsum, top-p mask scattered back, softmax, multinomial; plus the unfiltered log-prob PPO needs."""
    scores = logits / temperature  # (B, V)
    if top_k > 0:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]  # (B, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1)  # (B, V) ascending
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop_sorted = cum <= 1 - top_p
        drop_sorted[:, -1] = False  # the most likely token always stays
        scores = scores.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    tokens = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)  # (B,)
    logprobs = torch.log_softmax(logits / temperature, -1).gather(1, tokens[:, None]).squeeze(1)
    return tokens, logprobs


def validate(name, logits, kw, tokens, logprobs, max_outside=0, atol=2e-6):
    """tokens inside the reference's allowed set; logprobs = float64 log softmax(logits / T)[token]."""
    allowed = reference.sample_filter(logits, **kw) > float("-inf")  # (B, V)
    bad = (~allowed.gather(1, tokens[:, None])).sum().item()
    assert bad <= max_outside, f"{name}: {bad} tokens outside the allowed set"
    want = torch.log_softmax(logits.double() / kw.get("temperature", 1.0), -1).gather(1, tokens[:, None])[
        :, 0
    ]
    assert_close(name, logprobs.double(), want, rtol=0, atol=atol)


def run(args) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    # logits = randn * scale: scale 2 is flat (a top-p 0.9 nucleus of ~5k tokens at T = 0.8, the hard
    # case), scale 4 is peaked (a nucleus of ~10-150 tokens, more like a trained LM)
    main = dict(temperature=0.8, top_k=50, top_p=0.9)
    cases = [((64, 50304), main, 2.0, "<= 5 ms, >= 50x")]
    if not args.quick:
        cases += [
            ((64, 50304), dict(temperature=0.8, top_p=0.9), 2.0, ""),
            ((64, 50304), dict(temperature=0.8, top_p=0.9), 4.0, ""),
            ((64, 50304), dict(temperature=1.0), 2.0, ""),
            ((256, 50304), main, 2.0, ""),
            ((64, 128256), main, 2.0, ""),
        ]
    rows = []
    for (B, V), kw, scale, goal in cases:
        logits = torch.randn(B, V, generator=g) * scale
        validate("sample", logits, kw, *sample(logits, **kw, generator=g))
        # The baseline's fp32 cumsum over the sorted row may move the top-p boundary by a token or so, and
        # its fp32 log_softmax is off by up to ~1e-5.
        base_out = hf_sample(logits, **kw, generator=g)
        validate("sample baseline", logits, kw, *base_out, max_outside=B // 50, atol=1e-4)
        base = median_ms(lambda: hf_sample(logits, **kw, generator=g), reps=args.reps)
        ours = median_ms(lambda: sample(logits, **kw, generator=g), reps=args.reps)
        short = {"temperature": "T", "top_k": "k", "top_p": "p", "min_p": "min_p"}
        label = " ".join(f"{short[k]}{v:g}" for k, v in kw.items())  # e.g. T0.8 k50 p0.9
        rows.append(
            dict(
                op=f"sample {label}",
                shape=f"({B}, {V}) x{scale:g}",
                baseline="HF sort-based",
                base_ms=base,
                ours_ms=ours,
                goal=goal,
            )
        )
    return rows


if __name__ == "__main__":
    args = parse_args(__doc__)
    rows = run(args)
    print("all results match the reference")
    report("sample (fp32 logits)", rows)
