"""bench_cuda.py's sample rows alone, plus the cases that stress the sampler's other paths.

Validates first (tokens allowed by reference.sample_filter, the same tokens as the CPU kernel for the
same seed, run-to-run determinism), then times torch's sort-based sampler against ours in this process
with bench_cuda.py's timer. The extra rows: flat logits (top-p's nucleus is most of the row), many
ties (the radix fallback), top-k alone, greedy, and a tiny (1, 16) call: the per-call floor (Python,
dispatch, the status copy and sync), which no kernel speed-up removes.
Usage: python benchmarks/bench_sample_cuda.py [--reps N]
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cuda import cuda_ms, ensure_built, torch_sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "bench_sample_cuda needs a CUDA device"
    ensure_built()
    from fastrlhf.ops import reference, sample

    dev, bf = "cuda", torch.bfloat16
    torch.manual_seed(0)

    # ---- check ----------------------------------------------------------------------------------------
    for B, V in ((64, 50304), (16, 128256)):
        x = torch.randn(B, V, device=dev, dtype=bf) * 3
        for f in ({"top_k": 50, "top_p": 0.9}, {"top_p": 0.9}, {"top_k": 50}, {"top_p": 0.5, "min_p": 0.01}):
            gen = lambda: torch.Generator().manual_seed(7)
            tok, lp = sample(x, generator=gen(), **f)
            tok2, lp2 = sample(x, generator=gen(), **f)
            cpu_tok, _ = sample(x.cpu(), generator=gen(), **f)
            allowed = reference.sample_filter(x.cpu(), **f)  # (B, V)
            ok = bool(torch.isfinite(allowed.gather(1, tok.cpu()[:, None])).all())
            diff = int((tok.cpu() != cpu_tok).sum())
            same = torch.equal(tok, tok2) and torch.equal(lp, lp2)
            if not (ok and same and diff <= 1):
                sys.exit(
                    f"MISMATCH sample {f} ({B}, {V}): allowed {ok}, deterministic {same}, {diff} differ from CPU"
                )
    print("all results match", flush=True)

    # ---- time ---------------------------------------------------------------------------------------------
    rows = []

    def row(op, shape, base_ms, ours_ms):
        rows.append(
            {"op": op, "shape": shape, "base_ms": base_ms, "ours_ms": ours_ms, "ratio": base_ms / ours_ms}
        )

    for B, V in ((64, 50304), (256, 128256)):
        x = torch.randn(B, V, device=dev, dtype=bf) * 3
        flat = torch.randn(B, V, device=dev, dtype=bf)  # top-p .9 keeps ~70 % of the row
        ties = torch.randint(0, 4, (B, V), device=dev).to(bf)  # boundary bins of ~V/4 tokens: radix
        shape = f"({B}, {V}) bf16"
        for name, base, ours in (
            ("top-k50 top-p.9", partial(torch_sample, x, 50, 0.9), partial(sample, x, top_k=50, top_p=0.9)),
            ("top-p.9", partial(torch_sample, x, V, 0.9), partial(sample, x, top_p=0.9)),
            ("top-k50", partial(torch_sample, x, 50, 1.0), partial(sample, x, top_k=50)),
            ("top-p.9 flat", partial(torch_sample, flat, V, 0.9), partial(sample, flat, top_p=0.9)),
            ("top-p.9 ties", partial(torch_sample, ties, V, 0.9), partial(sample, ties, top_p=0.9)),
            ("greedy (vs argmax)", partial(torch.argmax, x, -1), partial(sample, x, temperature=0.0)),
        ):
            row(f"sample {name}", shape, cuda_ms(base, args.reps), cuda_ms(ours, args.reps))
    tiny = torch.randn(1, 16, device=dev)
    base, ours = partial(torch_sample, tiny, 16, 0.9), partial(sample, tiny, top_p=0.9)
    row("sample per-call floor", "(1, 16) fp32", cuda_ms(base, args.reps), cuda_ms(ours, args.reps))

    gpu = torch.cuda.get_device_name()
    for r in rows:
        print("JSON", json.dumps({**r, "baseline": "torch sort", "gpu": gpu, "torch": torch.__version__}))
    print(f"\nfastrlhf sample on {gpu} (torch {torch.__version__}; ratio = torch sort / ours)")
    print(f"{'op':24} {'shape':22} {'base ms':>8} {'ours ms':>8} {'ratio':>7}")
    for r in rows:
        print(f"{r['op']:24} {r['shape']:22} {r['base_ms']:8.3f} {r['ours_ms']:8.3f} {r['ratio']:6.2f}x")


if __name__ == "__main__":
    main()
