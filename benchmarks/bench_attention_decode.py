"""KV-cache decoding on CUDA: causal_attention with Tq = 1 (the split-KV kernel) vs SDPA's default.

Validates first (against float64 on the same bf16 inputs), then times, in one process, MHA and GQA decode
steps and a step that reads a KV-cache view k_cache[:, :, :Tk] (ours in place; SDPA takes the view as it
is). GB/s counts K and V read once, the least any kernel must move. Needs a CUDA device; builds the CUDA
kernels first if the installed fastrlhf has none (bench_cuda.ensure_built).
Usage: python benchmarks/bench_attention_decode.py [--reps N]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from bench_cuda import check, cuda_ms, ensure_built, rel_err, run_info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA device"
    ensure_built()
    from fastrlhf.ops import causal_attention, reference

    dev, bf = "cuda", torch.bfloat16
    torch.manual_seed(0)
    buf = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    hbm = 2 * buf.numel() / cuda_ms(buf.clone, args.reps) / 1e6  # GB/s, read + written

    def sdpa(q, k, v):  # Tq = 1 sees every key: no causal mask
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1])

    # (name, B, H, Hkv, Tk, max_len): max_len > Tk reads a view of a longer cache
    cases = [("MHA", 64, 16, 16, Tk, Tk) for Tk in (1024, 4096, 8192)]
    cases += [("GQA 4", 64, 32, 8, Tk, Tk) for Tk in (1024, 4096, 8192)]
    cases += [("MHA cache view", 64, 16, 16, 4000, 8192)]
    rows = []
    for name, B, H, Hkv, Tk, max_len in cases:
        D = 128
        q = torch.randn(B, H, 1, D, device=dev, dtype=bf)
        cache_k, cache_v = (torch.randn(B, Hkv, max_len, D, device=dev, dtype=bf) for _ in range(2))
        k, v = cache_k[:, :, :Tk], cache_v[:, :, :Tk]  # (B, Hkv, Tk, D)
        got = causal_attention(q, k, v)
        sub = slice(0, 4)  # a few batch rows against float64
        want = reference.causal_attention(q[sub].double(), k[sub].double(), v[sub].double())
        check(name, rel_err(got[sub], want) < 1e-2, f"rel err {rel_err(got[sub], want):.2e}")
        own = cuda_ms(lambda q=q, k=k, v=v: causal_attention(q, k, v), args.reps)
        base = cuda_ms(lambda q=q, k=k, v=v: sdpa(q, k, v), args.reps)
        gb = 2 * k.numel() * k.element_size() / 1e9
        rows.append(
            {
                "op": "attention decode",
                "case": name,
                "shape": f"B={B} H={H} Hkv={Hkv} Tk={Tk} D={D}"
                + (f" cache={max_len}" if max_len > Tk else ""),
                "base_ms": base,
                "ours_ms": own,
                "ratio": base / own,
                "ours_GBs": round(gb / own * 1e3),
                "base_GBs": round(gb / base * 1e3),
            }
        )
    print("all results match")
    info = run_info(hbm)
    for r in rows:
        print("JSON " + json.dumps({**r, **info}))
    print(
        f"\ndecode attention, bf16, Tq = 1, on {info['gpu']} (d2d copy {hbm:.0f} GB/s); ratio = SDPA / ours"
    )
    print(
        f"{'case':<16} {'shape':<40} {'SDPA ms':>8} {'ours ms':>8} {'ratio':>6} {'SDPA GB/s':>10} {'ours GB/s':>10}"
    )
    for r in rows:
        print(
            f"{r['case']:<16} {r['shape']:<40} {r['base_ms']:>8.3f} {r['ours_ms']:>8.3f} {r['ratio']:>5.2f}x "
            f"{r['base_GBs']:>10} {r['ours_GBs']:>10}"
        )


if __name__ == "__main__":
    main()
