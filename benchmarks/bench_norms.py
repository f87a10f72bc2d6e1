"""The Llama family's elementwise ops, fused, against the PyTorch a user writes (HF's modeling_llama):
RMSNorm (LlamaRMSNorm's formula), SwiGLU's gate (F.silu(g) * u) and rotary embeddings
(apply_rotary_pos_emb on the transposed projections, with cos/sin precomputed as HF does once per forward;
ours computes them in every call). Forward and forward+backward, fp32, at SmolLM2-135M's training-step
shape (B 8 x T 256, C 576, FFN 1536, 9/3 heads of 64) and a decode step's (16 rows); then each CPU path the
CPU offers on the training shape (the AVX-512 copy's gain)."""

from __future__ import annotations

import time

import fastrlhf
import torch
from _common import assert_close, interleaved_ms, parse_args, report
from fastrlhf.ops import reference, rms_norm, rope, swiglu

EPS = 1e-5


def timed_cases(N: int, T: int):
    """(op, shape, baseline name, baseline fn, ours fn, check) for N = B * T tokens of T positions."""
    B, C, F, H, Hkv, D = N // T, 576, 1536, 9, 3, 64
    x, w = torch.randn(B, T, C), 1 + 0.1 * torch.randn(C)
    g, u = torch.randn(B, T, F), torch.randn(B, T, F)
    q, k = torch.randn(B, T, H, D), torch.randn(B, T, Hkv, D)
    pos = torch.arange(T).expand(B, T) + (0 if T > 1 else 100)
    inv = 1.0 / (100000.0 ** (torch.arange(0, D, 2).float() / D))
    cos, sin = reference.hf_rope_cos_sin(pos, inv, q.dtype)

    def hf_rope(a, b):
        return reference.hf_apply_rotary_pos_emb(a.transpose(1, 2), b.transpose(1, 2), cos, sin)

    def our_rope(a, b):
        return rope(a, b, pos, inv)

    return [
        ("rms_norm", f"({B * T}, {C})", "HF LlamaRMSNorm", (reference.hf_rms_norm, rms_norm), (x, w, EPS)),
        ("swiglu", f"({B * T}, {F})", "F.silu(g) * u", (reference.hf_swiglu, swiglu), (g, u)),
        ("rope q+k", f"B{B} T{T} H{H}/{Hkv} D{D}", "HF apply_rotary_pos_emb", (hf_rope, our_rope), (q, k)),
    ]


def fwd_bwd(fn, *args):
    """The forward, then the backward of the sum of every output weighted by a fixed tensor."""
    ins = [
        a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
        for a in args
    ]
    out = fn(*ins)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(list(outs), [torch.ones_like(o) * 0.5 for o in outs])
    return [o.detach() for o in outs] + [
        a.grad for a in ins if isinstance(a, torch.Tensor) and a.grad is not None
    ]


def timed(fns, reps: int) -> list[float]:
    """Median ms of each fn, timed alternately (the load on a shared machine drifts), each sample a batch
    of calls lasting >= ~20 ms."""
    t0 = time.perf_counter()
    fns[0]()
    k = max(1, int(0.02 / max(time.perf_counter() - t0, 1e-6)))

    def batch(fn):
        return lambda: [fn() for _ in range(k)]

    return [ms / k for ms in interleaved_ms([batch(fn) for fn in fns], max(reps, 5))]


def path_times(fn, paths, reps: int) -> dict[str, float]:
    """fn's ms on each CPU path, timed alternately: {"path_avx2_ms": ...}."""
    before = fastrlhf.build_info()["cpu_path"]

    def on(path):
        def call():
            fastrlhf._ext._C.set_cpu_path(path)
            return fn()

        return call

    try:
        return {f"path_{p}_ms": ms for p, ms in zip(paths, timed([on(p) for p in paths], reps))}
    finally:
        fastrlhf._ext._C.set_cpu_path(before)


def run(args) -> list[dict]:
    rows = []
    shapes = [(2048, 256)] if args.quick else [(2048, 256), (16, 1)]
    paths = fastrlhf.build_info()["cpu_paths_supported"]
    for N, T in shapes:
        for op, shape, base_name, (base_fn, ours_fn), inputs in timed_cases(N, T):
            exact = fwd_bwd(base_fn, *[a.double() if isinstance(a, torch.Tensor) else a for a in inputs])
            for name, fn in ((op, ours_fn), (op + " baseline", base_fn)):
                for got, want in zip(fwd_bwd(fn, *inputs), exact):
                    assert_close(name, got.double(), want, rtol=1e-4, atol=1e-5)
            with torch.no_grad():
                b, o = timed([lambda: base_fn(*inputs), lambda: ours_fn(*inputs)], args.reps)
            rows.append(dict(op=op + " fwd", shape=shape, baseline=base_name, base_ms=b, ours_ms=o))
            fns = [lambda: fwd_bwd(base_fn, *inputs), lambda: fwd_bwd(ours_fn, *inputs)]
            b, o = timed(fns, args.reps)
            rows.append(dict(op=op + " fwd+bwd", shape=shape, baseline=base_name, base_ms=b, ours_ms=o))
            if T > 1 and len(paths) > 1:  # ours on every path, the training shape only
                rows[-1].update(path_times(lambda: fwd_bwd(ours_fn, *inputs), paths, args.reps))
    return rows


def report_paths(rows: list[dict]) -> None:
    rows = [r for r in rows if any(k.startswith("path_") for k in r)]
    if rows:
        print(f"\nours on each CPU path (ms; {fastrlhf.build_info()['cpu_path']} is the default on this CPU)")
    for r in rows:
        cells = "  ".join(f"{k[5:-3]} {v:.3f}" for k, v in r.items() if k.startswith("path_"))
        print(f"{r['op']:<22} {r['shape']:<24} {cells}")


if __name__ == "__main__":
    args = parse_args(__doc__)
    rows = run(args)
    print("all results match the reference")
    report("Llama elementwise ops (fp32; ratio = baseline / ours)", rows)
    report_paths(rows)
