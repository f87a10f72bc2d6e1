"""policy_loss: the fused kernel vs the eager loss a user writes (TRL's GRPOTrainer style) + autograd."""

from __future__ import annotations

import torch
from _common import assert_close, interleaved_ms, parse_args, report
from fastrlhf.ops import policy_loss, reference

# (name, agg, TRL's loss_type, eps_low, eps_high, beta): GRPO as published, and DAPO (clip-higher, no KL)
CONFIGS = [
    ("GRPO", "seq_mean_token_mean", "grpo", 0.2, 0.2, 0.04),
    ("DAPO", "token_mean", "bnpo", 0.2, 0.28, 0.0),
]


def trl_loss(logprobs, old_logprobs, advantages, mask, *, ref_logprobs, eps_low, eps_high, beta, loss_type):
    """GRPOTrainer._compute_loss (trl 0.2x), its metrics included: advantages (B,), mask float (B, T)."""
    coef_1 = torch.exp(logprobs - old_logprobs)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(coef_1 * advantages.unsqueeze(1), coef_2 * advantages.unsqueeze(1))
    per_token_kl = torch.zeros_like(per_token_loss)
    if beta != 0.0:  # only then is there a reference model
        per_token_kl = torch.exp(ref_logprobs - logprobs) - (ref_logprobs - logprobs) - 1
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    else:  # bnpo: the token mean
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    n = mask.sum().clamp(min=1.0)
    is_low = (coef_1 < 1 - eps_low) & (advantages.unsqueeze(1) < 0)
    is_high = (coef_1 > 1 + eps_high) & (advantages.unsqueeze(1) > 0)
    metrics = [(per_token_kl * mask).sum() / n, (is_low * mask).sum() / n, (is_high * mask).sum() / n]
    return loss, [m.detach() for m in metrics]


def ours(logprobs, old_logprobs, advantages, mask, *, ref_logprobs, eps_low, eps_high, beta, agg):
    loss, stats = policy_loss(
        logprobs, old_logprobs, advantages, mask, eps_low=eps_low, eps_high=eps_high, agg=agg,
        ref_logprobs=ref_logprobs, beta=beta,
    )  # fmt: skip
    return loss, [stats["kl"], stats["clipfrac_low"], stats["clipfrac_high"]]


def make(B: int, T: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """GRPO-like inputs and the reference's logprobs: one advantage per sequence; the mask keeps a random
    prefix of each row (every row has a token, so TRL's mean over all rows and ours over rows with tokens
    agree)."""
    lp = -3 * torch.rand(B, T)
    inputs = {
        "logprobs": lp.requires_grad_(),
        "old_logprobs": lp.detach() + 0.2 * torch.randn(B, T),
        "advantages": torch.randn(B),
        "mask": torch.arange(T) < torch.randint(T // 4, T + 1, (B,))[:, None],
    }
    return inputs, lp.detach() + 0.3 * torch.randn(B, T)


def fwd_bwd(fn, inputs, **kw):
    loss, stats = fn(**inputs, **kw)
    (grad,) = torch.autograd.grad(loss, inputs["logprobs"])
    return loss, stats, grad


def bench_shape(B: int, T: int, reps: int) -> list[dict]:
    inputs, ref_logprobs = make(B, T)
    trl_inputs = {**inputs, "mask": inputs["mask"].float()}  # TRL's completion_mask is an int/float tensor
    inputs64 = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    rows = []
    for name, agg, loss_type, eps_low, eps_high, beta in CONFIGS:
        ref = ref_logprobs if beta > 0 else None  # beta 0: no reference model at all
        kw = {"ref_logprobs": ref, "eps_low": eps_low, "eps_high": eps_high, "beta": beta}
        ref64 = None if ref is None else ref.double()
        want_loss, want_stats = reference.policy_loss(**inputs64, **{**kw, "ref_logprobs": ref64}, agg=agg)
        (want_grad,) = torch.autograd.grad(want_loss, inputs64["logprobs"])
        want = [want_loss, [want_stats[k] for k in ("kl", "clipfrac_low", "clipfrac_high")], want_grad]
        base = (trl_loss, trl_inputs, {**kw, "loss_type": loss_type})
        mine = (ours, inputs, {**kw, "agg": agg})
        for label, (fn, x, fkw) in (("TRL", base), ("ours", mine)):
            loss, stats, grad = fwd_bwd(fn, x, **fkw)
            got = [loss.double(), [s.double() for s in stats], grad.double()]
            assert_close(f"policy_loss {name} ({label})", got, want, rtol=1e-5, atol=1e-6)
        base_ms, ours_ms = interleaved_ms(
            [lambda c=c: fwd_bwd(c[0], c[1], **c[2]) for c in (base, mine)], reps
        )
        rows.append({"op": f"policy_loss {name}", "shape": f"({B}, {T})", "baseline": "TRL GRPO loss, eager",
                     "base_ms": base_ms, "ours_ms": ours_ms, "agg": agg, "beta": beta})  # fmt: skip
    return rows


def run(args) -> list[dict]:
    shapes = [(64, 512)] if args.quick else [(64, 512), (256, 1024)]
    return [row for B, T in shapes for row in bench_shape(B, T, max(args.reps, 5) * 4)]


if __name__ == "__main__":
    args = parse_args(__doc__)
    rows = run(args)
    print("all results match the reference")
    report("policy_loss fwd+bwd (fp32; ratio = baseline / ours)", rows)
