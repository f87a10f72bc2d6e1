"""linear_cross_entropy (the LM head fused with the loss, in row chunks) vs the unfused path the GPT used
before: logits = h @ W.T, then ops.token_logprobs and its backward (and vs eager F.cross_entropy, as in HF).
Forward + backward of the LM head and the mean next-token loss at GPT-2's vocabulary."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from _common import assert_close, interleaved_ms, parse_args, report
from fastrlhf.ops import linear_cross_entropy, reference, token_logprobs


def unfused(h, w, t):
    keep = t != -100  # (N,)
    return -(token_logprobs(h @ w.t(), torch.where(keep, t, 0)) * keep).sum() / keep.sum()


def eager(h, w, t):
    return F.cross_entropy(h @ w.t(), t, ignore_index=-100)


def fwd_bwd(fn, h, w, t):
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    loss = fn(h, w, t)
    return (loss, *torch.autograd.grad(loss, (h, w)))


def run(args) -> list[dict]:
    N, C, V = (256, 256, 50257) if args.quick else (2048, 256, 50257)
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(N, C, generator=g), torch.randn(V, C, generator=g) * 0.02
    t = torch.randint(0, V, (N,), generator=g)
    t[255::256] = -100  # the last position of each (., 256) sequence has no next token
    small = slice(0, 64)
    assert_close("linear_cross_entropy vs float64 reference",
                 [x.double() for x in fwd_bwd(linear_cross_entropy, h[small], w, t[small])],
                 fwd_bwd(reference.linear_cross_entropy, h[small].double(), w.double(), t[small]),
                 rtol=1e-5, atol=1e-7)  # fmt: skip
    assert_close("linear_cross_entropy vs unfused", fwd_bwd(linear_cross_entropy, h, w, t),
                 fwd_bwd(unfused, h, w, t), rtol=1e-4, atol=1e-6)  # fmt: skip
    rows = []
    reps = min(args.reps, 5)  # a call is seconds long at full size
    for name, base in (("unfused (token_logprobs)", unfused), ("eager cross_entropy", eager)):
        base_ms, ours_ms = interleaved_ms([lambda b=base: fwd_bwd(b, h, w, t),
                                           lambda: fwd_bwd(linear_cross_entropy, h, w, t)], reps)  # fmt: skip
        rows.append({"op": "linear_cross_entropy", "shape": f"({N}, {C}) x ({V}, {C})", "baseline": name,
                     "base_ms": base_ms, "ours_ms": ours_ms, "goal": "LM head + loss, fwd+bwd"})  # fmt: skip
    return rows


if __name__ == "__main__":
    args = parse_args(__doc__)
    rows = run(args)
    print("all results match the reference")
    report("linear_cross_entropy on CPU (fp32; ratio = baseline / ours)", rows)
