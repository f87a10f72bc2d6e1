"""The tensor-core attention forward against SDPA's default backend (CUDA only), bench_cuda.py's shapes.

B * T = 16k tokens, H * D = 2048, causal, bf16; validates each shape against SDPA first, then times both
in this process (CUDA events, medians) and prints TFLOP/s (causal: half the score matrix) and the ratio.
Usage: python benchmarks/bench_attention_mma.py [--reps N] [--dtype bf16|f16]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from bench_cuda import cuda_ms, ensure_built, rel_err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--dtype", choices=["bf16", "f16"], default="bf16")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    ensure_built()
    from fastrlhf.ops import causal_attention

    dt = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    rows = []
    for D in (64, 128):
        for T in (512, 1024, 2048, 4096, 8192):
            B, H = 16384 // T, 2048 // D
            q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=dt) for _ in range(3))
            ours_out = causal_attention(q, k, v)
            sdpa_out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            err = rel_err(ours_out, sdpa_out)
            assert err < 1e-2, f"mismatch at T={T} D={D}: {err}"
            flops = 4 * B * H * T * T * D / 2
            ours = cuda_ms(lambda q=q, k=k, v=v: causal_attention(q, k, v), args.reps)
            base = cuda_ms(
                lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True), args.reps
            )
            rows.append(
                {
                    "T": T,
                    "D": D,
                    "B": B,
                    "H": H,
                    "ours_ms": round(ours, 4),
                    "sdpa_ms": round(base, 4),
                    "ours_tflops": round(flops / ours / 1e9, 1),
                    "sdpa_tflops": round(flops / base / 1e9, 1),
                    "ratio": round(base / ours, 3),
                    "rel_err_vs_sdpa": round(err, 5),
                }
            )
    print("all results match SDPA")
    print(f"{'shape':<28}{'SDPA ms':>9}{'ours ms':>9}{'SDPA TF':>9}{'ours TF':>9}{'ratio':>7}")
    for r in rows:
        shape = f"T={r['T']} D={r['D']} B={r['B']} H={r['H']}"
        print(
            f"{shape:<28}{r['sdpa_ms']:>9.3f}{r['ours_ms']:>9.3f}{r['sdpa_tflops']:>9.1f}{r['ours_tflops']:>9.1f}"
            f"{r['ratio']:>7.2f}"
        )
    for r in rows:
        print(
            json.dumps(
                {
                    "bench": "attention_mma_fwd",
                    "dtype": args.dtype,
                    "gpu": torch.cuda.get_device_name(),
                    "torch": torch.__version__,
                    **r,
                }
            )
        )


if __name__ == "__main__":
    main()
