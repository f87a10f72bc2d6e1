"""GAE: the fused kernel vs the reverse Python loop as TRL/OpenRLHF/cleanrl write it."""

from __future__ import annotations

import torch
from _common import assert_close, median_ms, parse_args, report
from fastrlhf.ops import gae, reference


def trl_loop(rewards, values, mask, gamma=1.0, lam=0.95):
    """The baseline, as TRL's PPOTrainer writes it: pads zeroed, then a reverse loop over T."""
    rewards, values = rewards * mask, values * mask
    T = rewards.shape[1]
    lastgaelam, reversed_adv = 0, []
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        reversed_adv.append(lastgaelam)
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    return advantages * mask, (advantages + values) * mask


def run(args) -> list[dict]:
    rows = []
    shapes = [(64, 512)] if args.quick else [(64, 512), (8, 4096), (256, 1024)]
    for B, T in shapes:
        rewards, values = torch.randn(B, T), torch.randn(B, T)
        mask = torch.arange(T) < torch.randint(T // 2, T + 1, (B,))[:, None]
        want = reference.gae(rewards, values, mask)
        assert_close("gae", gae(rewards, values, mask), want, rtol=1e-5, atol=1e-5)
        assert_close("gae baseline", trl_loop(rewards, values, mask), want, rtol=1e-5, atol=1e-5)
        base = median_ms(lambda: trl_loop(rewards, values, mask), reps=args.reps)
        ours = median_ms(lambda: gae(rewards, values, mask), reps=args.reps)
        goal = "<= 0.1 ms, >= 250x" if (B, T) == (64, 512) else ""
        rows.append(
            dict(
                op="gae",
                shape=f"({B}, {T})",
                baseline="TRL reverse loop",
                base_ms=base,
                ours_ms=ours,
                goal=goal,
            )
        )
    return rows


if __name__ == "__main__":
    args = parse_args(__doc__)
    print("all results match the reference")
    report("gae (fp32)", run(args))
