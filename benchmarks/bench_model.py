"""GPT end to end: a training step and batched generation, ours vs transformers' GPT2LMHeadModel (sdpa)
with the same config, weights and batch. Validates first (same loss, same greedy tokens), then times both
in this process. Ratio = HF time / our time (higher is better)."""

from __future__ import annotations

import argparse
import statistics

import torch
import transformers

from _common import interleaved_ms, interleaved_times, report
from fastrlhf.model import GPT, GPTConfig, generate
from fastrlhf.model.hf import to_hf_model
from fastrlhf.train.optim import OptimConfig, make_adamw


def train_rows(args) -> list[dict]:
    B, T = (4, 128) if args.quick else (8, 256)
    cfg = GPTConfig(vocab_size=args.vocab, block_size=T, n_layer=4, n_head=4, n_embd=256)
    ours = GPT(cfg).train()
    hf = to_hf_model(ours).train()
    x = torch.randint(0, cfg.vocab_size, (B, T))
    y = torch.roll(x, -1, 1)
    y[:, -1] = -100
    # HF shifts labels itself: labels = x gives the same targets as our (x, y)
    torch.testing.assert_close(ours(x, y)[1], hf(x, labels=x).loss, atol=1e-4, rtol=1e-4)
    opt_ours, opt_hf = make_adamw(ours, OptimConfig()), make_adamw(hf, OptimConfig())

    def step_ours():
        ours(x, y)[1].backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_hf():
        hf(x, labels=x).loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)

    times = interleaved_times([step_hf, step_ours], args.reps)
    (base, mine), (best_base, best_ours) = [statistics.median(t) for t in times], [min(t) for t in times]
    shape = f"L4 C256 B{B} T{T} V{cfg.vocab_size}"
    return [dict(op="train step", shape=shape, baseline="HF GPT2LMHeadModel sdpa", base_ms=base, ours_ms=mine,
                 goal=">= 1.3x", tokens_per_s_ours=B * T / mine * 1e3, tokens_per_s_hf=B * T / base * 1e3,
                 best_base_ms=best_base, best_ours_ms=best_ours, best_ratio=best_base / best_ours,
                 # each round's HF / ours: the two steps of a round share that moment's load
                 paired_ratio=statistics.median(b / o for b, o in zip(*times)))]


def gen_rows(args) -> list[dict]:
    n_prompts, new = (4, 16) if args.quick else (16, 64)
    cfg = GPTConfig(vocab_size=args.vocab, block_size=256, n_layer=4, n_head=4, n_embd=256)
    ours = GPT(cfg).eval()
    hf = to_hf_model(ours)
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(8, 33, (n_prompts,), generator=g).tolist()
    prompts = [torch.randint(0, cfg.vocab_size - 1, (n,), generator=g).tolist() for n in lens]
    Tp = max(lens)
    ids = torch.tensor([[0] * (Tp - len(p)) + p for p in prompts])  # left padding, as HF wants for decoding
    attn = torch.tensor([[0] * (Tp - len(p)) + [1] * len(p) for p in prompts])
    hf.generation_config.pad_token_id = 0

    def run_hf(**kw):
        return hf.generate(ids, attention_mask=attn, max_new_tokens=new, min_new_tokens=new, **kw)[:, Tp:]

    greedy_hf = run_hf(do_sample=False)
    greedy_ours = generate(ours, prompts, new, temperature=0.0).responses
    match = (greedy_hf == greedy_ours).float().mean().item()
    # fp32 summation order differs between the two models; a near-tie argmax may flip and then diverge
    assert match > 0.9, f"greedy tokens agree on only {match:.0%} of positions"
    sampling = dict(top_k=50, top_p=0.9)
    base, mine = interleaved_ms([lambda: run_hf(do_sample=True, temperature=1.0, **sampling),
                                 lambda: generate(ours, prompts, new, **sampling, generator=g)], args.reps)
    tokens = n_prompts * new
    return [dict(op="generate", shape=f"{n_prompts} prompts x {new} new, V{cfg.vocab_size}",
                 baseline="HF generate top-k/top-p", base_ms=base, ours_ms=mine, goal=">= 3x",
                 tokens_per_s_ours=tokens / mine * 1e3, tokens_per_s_hf=tokens / base * 1e3,
                 greedy_agreement=match)]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions; the median is reported")
    ap.add_argument("--quick", action="store_true", help="smaller shapes (smoke run)")
    ap.add_argument("--vocab", type=int, default=50257, help="vocabulary size (GPT-2: 50257)")
    ap.add_argument("--only", choices=("train", "generate"), help="run one of the two")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    rows = ([] if args.only == "generate" else train_rows(args)) + ([] if args.only == "train" else gen_rows(args))
    print("all results match (same loss; greedy decoding agrees)")
    report("GPT end to end on CPU (fp32; ratio = HF / ours)", rows)
