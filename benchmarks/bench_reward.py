"""Reward-model training step: K-wise batching (one ranking = K sequences, loss over its C(K, 2) pairs)
vs the same rankings flattened into independent pairs (2 * C(K, 2) sequences), as the usual trainers
do. Same model, same rankings, same AdamW step. Validates first (with K fixed the two losses are equal at
the same weights; the shared-prefix forward gives the plain forward's loss), then times all sides
alternately in this process. Ratio = baseline time / K-wise time per ranking (goal >= 2x at K = 4).
Rows: vs pairs through the plain forward (what the usual trainers run), vs pairs through the same
shared-prefix forward (the batching alone: a pair shares its prompt once, a ranking once for K), and
K-wise through the plain forward (the gain of model.shared alone).

    .venv/bin/python benchmarks/bench_reward.py [--k 4] [--rankings 4] [--seq 64] [--quick]"""

from __future__ import annotations

import argparse

import torch
from _common import interleaved_ms, report
from fastrlhf.models import GPT, GPTConfig, ScalarHeadModel
from fastrlhf.train.optim import OptimConfig, make_adamw
from fastrlhf.train.reward import as_pairs, kwise_loss, score_batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--rankings", type=int, default=4, help="rankings per training step")
    ap.add_argument("--seq", type=int, default=64, help="tokens per response sequence (prompt + response)")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    R, K, T = (2, args.k, 32) if args.quick else (args.rankings, args.k, args.seq)
    reps = 3 if args.quick else args.reps
    cfg = GPTConfig(vocab_size=args.vocab, block_size=max(T, 32), n_layer=4, n_head=4, n_embd=256)
    torch.manual_seed(0)
    rm = ScalarHeadModel.from_gpt(GPT(cfg)).train()
    gen = torch.Generator().manual_seed(0)
    rankings = []
    for _ in range(R):  # K responses of a shared prompt, lengths T - 7 .. T, best-first order shuffled
        prompt = torch.randint(0, cfg.vocab_size, (T // 2,), generator=gen).tolist()
        seqs = [
            prompt + torch.randint(0, cfg.vocab_size, (T - T // 2 - j % 8,), generator=gen).tolist()
            for j in range(K)
        ]
        order = torch.randperm(K, generator=gen).tolist()
        rankings.append((seqs, [(order[a], order[b]) for a in range(K) for b in range(a + 1, K)]))
    pairs = as_pairs(rankings)
    cpu = torch.device("cpu")

    def loss_of(batch, share=True):
        return kwise_loss(*score_batch(rm, batch, 0, cpu, share))

    with torch.no_grad():  # validation: K fixed, so mean over rankings of pair means = mean over all pairs
        a, b, c = loss_of(rankings), loss_of(pairs), loss_of(pairs, share=False)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    print(
        f"all results match: K-wise loss {a.item():.6f} == independent-pairs loss {b.item():.6f} (shared "
        f"prefix) == {c.item():.6f} (plain forward)"
    )

    opt = make_adamw(rm, OptimConfig(lr=1e-5, min_lr=0.0))

    def step(batch, share=True):
        def run():
            loss_of(batch, share).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return run

    pairs_plain, pairs_shared, kwise_plain, ours_ms = interleaved_ms(
        [step(pairs, False), step(pairs), step(rankings, False), step(rankings)], reps
    )
    n_pairs = len(pairs)
    shape = f"R={R} T={T} pairs={n_pairs}"
    row = dict(shape=shape, ours_ms=ours_ms / R, seqs_kwise=R * K, seqs_pairs=2 * n_pairs)
    report(
        "reward model training step per ranking (fwd + bwd + AdamW), n_layer 4, n_embd 256",
        [
            {
                **row,
                "op": f"K={K} vs pairs plain",
                "baseline": "pairs, plain forward",
                "base_ms": pairs_plain / R,
                "goal": ">= 2x",
            },
            {
                **row,
                "op": f"K={K} vs pairs shared",
                "baseline": "pairs, shared forward",
                "base_ms": pairs_shared / R,
                "goal": ">= 2x",
            },
            {
                **row,
                "op": f"K={K} vs K-wise plain",
                "baseline": "K-wise, plain forward",
                "base_ms": kwise_plain / R,
                "goal": "",
            },
        ],
    )


if __name__ == "__main__":
    main()
