"""rows_linear: x (N, K) @ W (M, K)^T for a few rows (a decode step's LM head and block linears) vs
F.linear (torch's GEMM) on the same tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from _common import assert_close, median_ms, parse_args, report
from fastrlhf.ops import rows_linear


def run(args) -> list[dict]:
    rows = []
    # (N, M, K): LM head of GPT-2's vocabulary for 16 / 1 / 64 sequences, then a C=256 block's MLP
    shapes = (
        [(16, 50257, 256)]
        if args.quick
        else [(16, 50257, 256), (1, 50257, 256), (64, 50257, 256), (16, 1024, 256), (16, 256, 1024)]
    )
    for N, M, K in shapes:
        x, w, b = torch.randn(N, K), torch.randn(M, K) * K**-0.5, torch.randn(M)
        want = F.linear(x.double(), w.double(), b.double())
        assert_close("rows_linear", rows_linear(x, w, b).double(), want, rtol=1e-5, atol=1e-5)
        base = median_ms(lambda: F.linear(x, w, b), reps=args.reps)
        ours = median_ms(lambda: rows_linear(x, w, b), reps=args.reps)
        goal = "decode-step LM head" if (N, M) == (16, 50257) else ""
        rows.append(
            dict(
                op="rows_linear",
                shape=f"({N}, {K}) x ({M}, {K})",
                baseline="F.linear (MKL)",
                base_ms=base,
                ours_ms=ours,
                goal=goal,
            )
        )
    return rows


if __name__ == "__main__":
    args = parse_args(__doc__)
    print("all results match the reference")
    report("rows_linear (fp32)", run(args))
