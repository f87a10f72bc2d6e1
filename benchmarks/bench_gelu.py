"""GELU (tanh): the fused kernel vs F.gelu(x, approximate="tanh"), forward and forward+backward, at the
train step's MLP activation (B*T = 2048 rows of 4C = 1024) and at a decode step's (16 rows)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from _common import assert_close, median_ms, parse_args, report
from fastrlhf.ops import gelu, reference


def torch_gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def fwd_bwd(fn, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    x.grad = None
    fn(x).backward(dy)
    return x.grad


def run(args) -> list[dict]:
    rows = []
    shapes = [(2048, 1024)] if args.quick else [(2048, 1024), (16, 1024)]
    for N, C in shapes:
        x = (torch.randn(N, C) * 2).requires_grad_()
        dy = torch.randn(N, C)
        x64 = x.detach().double().requires_grad_()
        want_y, want_dx = reference.gelu(x64.detach()), fwd_bwd(torch_gelu, x64, dy.double())
        for name, fn in (("gelu", gelu), ("gelu baseline", torch_gelu)):
            assert_close(name, fn(x.detach()).double(), want_y, rtol=1e-5, atol=1e-5)
            assert_close(name + " grad", fwd_bwd(fn, x, dy).double(), want_dx, rtol=1e-5, atol=1e-5)
        shape, base = f"({N}, {C})", 'F.gelu(approximate="tanh")'
        xd = x.detach()
        goal = ">= 4x" if N == 2048 else ""
        with torch.no_grad():
            b, o = (
                median_ms(lambda: torch_gelu(xd), reps=args.reps),
                median_ms(lambda: gelu(xd), reps=args.reps),
            )
        rows.append(dict(op="gelu fwd", shape=shape, baseline=base, base_ms=b, ours_ms=o, goal=goal))
        b = median_ms(lambda: fwd_bwd(torch_gelu, x, dy), reps=args.reps)
        o = median_ms(lambda: fwd_bwd(gelu, x, dy), reps=args.reps)
        rows.append(dict(op="gelu fwd+bwd", shape=shape, baseline=base, base_ms=b, ours_ms=o, goal=goal))
    return rows


if __name__ == "__main__":
    args = parse_args(__doc__)
    rows = run(args)
    print("all results match the reference")
    report("gelu tanh (fp32)", rows)
