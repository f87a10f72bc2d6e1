"""ppo_loss: the fused kernel vs the eager PyTorch loss (reference.ppo_loss, the TRL form) + autograd."""

from __future__ import annotations

import torch
from _common import assert_close, median_ms, parse_args, report
from fastrlhf.ops import ppo_loss, reference
from fastrlhf.ops.reference import PPO_STATS


def make(B, T, full_mask=False):
    """PPO-like inputs; the mask keeps a random prefix of each row (right-padded responses) unless full."""
    lp = torch.randn(B, T)
    full = torch.full((B,), T)  # (B,) response lengths when nothing is padded
    inputs = {
        "logprobs": lp.requires_grad_(),
        "old_logprobs": lp.detach() + 0.2 * torch.randn(B, T),
        "advantages": torch.randn(B, T),
        "values": torch.randn(B, T).requires_grad_(),
        "old_values": torch.randn(B, T),
        "returns": torch.randn(B, T),
        "mask": torch.arange(T) < (full if full_mask else torch.randint(T // 4, T + 1, (B,)))[:, None],
    }
    return inputs, torch.rand(B, T).requires_grad_()


def fwd_bwd(fn, inputs, entropy):
    loss, stats = fn(**inputs, entropy=entropy, ent_coef=0.01)
    grads = torch.autograd.grad(loss, (inputs["logprobs"], inputs["values"], entropy))
    return loss, [stats[k] for k in PPO_STATS], grads


def bench_shape(B: int, T: int, reps: int, full_mask: bool = False) -> list[dict]:
    inputs, entropy = make(B, T, full_mask)
    inputs64 = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    want = fwd_bwd(reference.ppo_loss, inputs64, entropy.double())
    loss, stats, grads = fwd_bwd(ppo_loss, inputs, entropy)
    got = [loss.double(), [s.double() for s in stats], [g.double() for g in grads]]
    assert_close("ppo_loss", got, list(want), rtol=1e-5, atol=1e-6)
    shape = f"({B}, {T})" + (" full mask" if full_mask else "")
    base = median_ms(lambda: fwd_bwd(reference.ppo_loss, inputs, entropy), reps=reps)
    ours = median_ms(lambda: fwd_bwd(ppo_loss, inputs, entropy), reps=reps)
    goal = ">= 10x" if (B, T) == (64, 512) and not full_mask else ""
    rows = [
        {"op": "ppo_loss fwd+bwd", "shape": shape, "baseline": "eager + autograd", "base_ms": base, "ours_ms": ours,
         "goal": goal}
    ]  # fmt: skip
    with torch.no_grad():
        base = median_ms(lambda: reference.ppo_loss(**inputs, entropy=entropy, ent_coef=0.01), reps=reps)
        ours = median_ms(lambda: ppo_loss(**inputs, entropy=entropy, ent_coef=0.01), reps=reps)
    rows.append({"op": "ppo_loss fwd only", "shape": shape, "baseline": "eager, no_grad", "base_ms": base,
                 "ours_ms": ours})  # fmt: skip
    return rows


def run(args) -> list[dict]:
    shapes = [(64, 512)] if args.quick else [(64, 512), (8, 128), (256, 1024)]
    rows = [row for B, T in shapes for row in bench_shape(B, T, args.reps)]
    # The kernel skips the math of fully masked 8-token vectors (padding); this row has none to skip.
    return rows + bench_shape(64, 512, args.reps, full_mask=True)


if __name__ == "__main__":
    args = parse_args(__doc__)
    rows = run(args)
    print("all results match the reference")
    report("ppo_loss (fp32; ratio = baseline / ours)", rows)
