"""Build, check and time every CUDA op in one go (issue 7); prints a short table last.

1. build: if the installed fastrlhf has no CUDA kernels, `pip install --no-build-isolation --no-deps -e .`
   (with the torch next to this Python) and re-run this script;
2. check: each op on CUDA tensors against its reference (stops at the first mismatch);
3. time (CUDA events, medians): ours vs PyTorch in this process: SDPA's default and cuDNN backends,
   torch's sort-based sampling, eager logprobs/ppo_loss/gae, and the HBM bandwidth of a d2d copy.
Usage: python benchmarks/bench_cuda.py [--quick] [--reps N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def ensure_built() -> None:
    import fastrlhf

    if fastrlhf.build_info().get("cuda"):
        return
    if os.environ.get("FR_BENCH_BUILT"):
        sys.exit("the build finished but fastrlhf still has no CUDA kernels: see the cmake output above")
    print("fastrlhf has no CUDA kernels here: building them ...", flush=True)
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", str(ROOT)]
    subprocess.run(cmd, check=True)
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "FR_BENCH_BUILT": "1"})


def cuda_ms(fn, reps: int = 10, inner: int | None = None) -> float:
    """Median ms of fn() by CUDA events; each sample runs fn `inner` times (chosen for ~20 ms)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    if inner is None:
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        inner = max(1, min(200, int(20.0 / max(s.elapsed_time(e), 1e-3))))
    samples = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(inner):
            fn()
        e.record()
        e.synchronize()
        samples.append(s.elapsed_time(e) / inner)
    return statistics.median(samples)


def run_info(hbm: float) -> dict:
    """What every JSON line carries: the GPU, torch, the measured d2d bandwidth, commit and compiler."""
    import fastrlhf

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], check=False, cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "hbm_GBs": round(hbm),
        "commit": commit,
        "build": fastrlhf.build_info().get("compiler"),
    }


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def check(name: str, ok: bool, detail: str = "") -> None:
    if not ok:
        sys.exit(f"MISMATCH in {name}: {detail}")


# ---- baselines -------------------------------------------------------------------------------------------
def torch_sample(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """The usual sort-based top-k/top-p sampler (HF/vLLM style): sort, softmax, cumsum, mask, draw."""
    sorted_x, idx = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    sorted_x[:, top_k:] = float("-inf")
    probs = sorted_x.float().softmax(-1)
    cum = probs.cumsum(-1)
    probs[(cum - probs) > top_p] = 0.0
    choice = torch.multinomial(probs, 1)  # (B, 1)
    return idx.gather(1, choice).squeeze(1)


def eager_logprobs_fwd_bwd(x: torch.Tensor, t: torch.Tensor) -> None:
    x = x.detach().requires_grad_()
    logp = torch.log_softmax(x.float(), dim=-1)  # (N, V) fp32, as most trainers do
    lp = logp.gather(-1, t[:, None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    torch.autograd.grad(lp.sum() + ent.sum(), x)  # the gradient alone: no accumulation into x.grad


def graph_ms(fn, reps: int, calls: int = 20) -> float:
    """Median device ms per fn() from replays of a CUDA graph of `calls` calls: no host overhead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm-up outside the graph (allocator, module load)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return cuda_ms(g.replay, reps) / calls


def kernels_launched(fn, name: str) -> int:
    """How many CUDA kernels whose name holds `name` fn() launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and name in e.name)


BASE_KEYS = {"op", "shape", "baseline", "base_ms", "ours_ms", "ratio", "goal"}


def extras(r: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in r.items() if k not in BASE_KEYS)


def llama_elementwise_rows(row, reps: int, hbm: float) -> None:
    """rms_norm, swiglu and rope (fwd+bwd, bf16) at a Llama training step's shape (16k tokens, C 2048,
    FFN 8192, 16/4 heads of 128) against HF's formulas; GB/s counts each kernel's reads and writes once."""
    from fastrlhf.ops import reference, rms_norm, rope, swiglu

    dev, bf, N, C, Fd, H, Hkv, D = "cuda", torch.bfloat16, 16384, 2048, 8192, 16, 4, 128
    x = torch.randn(N, C, device=dev, dtype=bf, requires_grad=True)
    w = torch.ones(C, device=dev, dtype=bf, requires_grad=True)
    g, u = (torch.randn(N, Fd, device=dev, dtype=bf, requires_grad=True) for _ in range(2))
    q = torch.randn(8, N // 8, H, D, device=dev, dtype=bf, requires_grad=True)
    k = torch.randn(8, N // 8, Hkv, D, device=dev, dtype=bf, requires_grad=True)
    pos = torch.arange(N // 8, device=dev).expand(8, N // 8)
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=dev).float() / D))
    cos, sin = reference.hf_rope_cos_sin(pos, inv, bf)

    def fwd_bwd(fn):
        def run():
            outs = fn()
            outs = outs if isinstance(outs, tuple) else (outs,)
            torch.autograd.backward(list(outs), [torch.ones_like(o) for o in outs])

        return run

    cases = [
        (
            "rms_norm fwd+bwd",
            f"({N}, {C}) bf16",
            "HF LlamaRMSNorm",
            lambda: reference.hf_rms_norm(x, w, 1e-5),
            lambda: rms_norm(x, w, 1e-5),
            5 * x.numel() * 2,
        ),  # x, y; dy, x, dx
        (
            "swiglu fwd+bwd",
            f"({N}, {Fd}) bf16",
            "F.silu(g) * u",
            lambda: reference.hf_swiglu(g, u),
            lambda: swiglu(g, u),
            8 * g.numel() * 2,
        ),  # g, u, y; g, u, dy, dg, du
        (
            "rope fwd+bwd",
            f"B8 T{N // 8} H{H}/{Hkv} D{D} bf16",
            "HF apply_rotary",
            lambda: reference.hf_apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin),
            lambda: rope(q, k, pos, inv),
            4 * (q.numel() + k.numel()) * 2,
        ),
    ]
    for op, shape, base_name, base, ours, nbytes in cases:
        ours_ms = cuda_ms(fwd_bwd(ours), reps)
        row(
            op,
            shape,
            base_name,
            cuda_ms(fwd_bwd(base), reps),
            ours_ms,
            ">= 1.5x",
            GBs=round(nbytes / ours_ms / 1e6),
            hbm_frac=round(nbytes / ours_ms / 1e6 / hbm, 3),
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer shapes and reps")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument(
        "--only", default="", help="comma list of gae,ppo_loss,token_logprobs,sample,attention,decode,norms"
    )
    args = ap.parse_args()
    assert torch.cuda.is_available(), "bench_cuda needs a CUDA device"
    ensure_built()
    from fastrlhf.ops import causal_attention, gae, ppo_loss, reference, sample, token_logprobs

    dev, bf = "cuda", torch.bfloat16
    reps = 3 if args.quick else args.reps
    torch.manual_seed(0)
    rows: list[dict] = []
    only = set(filter(None, args.only.split(",")))

    def want(op: str) -> bool:
        return not only or op in only

    def row(op, shape, baseline, base_ms, ours_ms, goal="", **extra):
        rows.append(
            {
                "op": op,
                "shape": shape,
                "baseline": baseline,
                "base_ms": base_ms,
                "ours_ms": ours_ms,
                "ratio": base_ms / ours_ms,
                "goal": goal,
                **extra,
            }
        )

    # ---- check ----------------------------------------------------------------------------------------
    r, v = torch.randn(64, 512, device=dev), torch.randn(64, 512, device=dev)
    m = torch.rand(64, 512, device=dev) > 0.2
    for a, b in zip(gae(r.double(), v.double(), m), reference.gae(r.double(), v.double(), m)):
        check("gae", torch.equal(a, b))
    xs = [torch.randn(64, 512, device=dev) * 0.3 for _ in range(6)]
    check("ppo_loss", rel_err(ppo_loss(*xs, m)[0], reference.ppo_loss(*xs, m)[0]) < 1e-5)
    x = torch.randn(64, 3000, device=dev, dtype=bf) * 3
    t = torch.randint(0, 3000, (64,), device=dev)
    for a, b in zip(
        token_logprobs(x, t, return_entropy=True), reference.token_logprobs(x.float(), t, return_entropy=True)
    ):
        check("token_logprobs", rel_err(a, b) < 1e-2, f"{rel_err(a, b)}")
    tok, _ = sample(x, top_k=50, top_p=0.9)
    allowed = reference.sample_filter(x, top_k=50, top_p=0.9)
    check("sample", bool(torch.isfinite(allowed.gather(1, tok[:, None])).all()))
    q, k, vv = (torch.randn(2, 8, 300, 64, device=dev, dtype=bf) for _ in range(3))
    check(
        "causal_attention",
        rel_err(
            causal_attention(q, k, vv),
            F.scaled_dot_product_attention(q.float(), k.float(), vv.float(), is_causal=True),
        )
        < 1e-2,
    )
    print("all results match the reference", flush=True)

    # ---- HBM bandwidth ------------------------------------------------------------------------------------
    buf = torch.empty(2 * 1024**3, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(buf)
    copy_ms = cuda_ms(lambda: dst.copy_(buf), reps)
    hbm = 2 * buf.numel() / copy_ms / 1e6  # GB/s, bytes read + written
    print(f"d2d copy: {hbm:.0f} GB/s", flush=True)

    # ---- gae, ppo_loss ------------------------------------------------------------------------------------
    for B, T in ((64, 512), (8, 4096)) if want("gae") else ():
        r, v = torch.randn(B, T, device=dev), torch.randn(B, T, device=dev)
        m = torch.rand(B, T, device=dev) > 0.1
        row(
            "gae",
            f"({B}, {T}) fp32",
            "eager reference",
            cuda_ms(lambda: reference.gae(r, v, m), reps),
            cuda_ms(lambda: gae(r, v, m), reps),
            "one launch; <= 10 us at (64, 512)",
            graph_us=round(1e3 * graph_ms(lambda: gae(r, v, m), reps), 2),  # device time per call
            kernels=kernels_launched(lambda: gae(r, v, m), "gae"),
        )
    if want("ppo_loss"):
        xs = [torch.randn(64, 512, device=dev, requires_grad=i in (0, 3)) for i in range(6)]
        m = torch.rand(64, 512, device=dev) > 0.2

        def ppo_step(fn):
            loss, _ = fn(*xs, m)
            loss.backward()

        row(
            "ppo_loss fwd+bwd",
            "(64, 512) fp32",
            "eager reference",
            cuda_ms(lambda: ppo_step(reference.ppo_loss), reps),
            cuda_ms(lambda: ppo_step(ppo_loss), reps),
            "one kernel each way",
            kernels_fwd=kernels_launched(lambda: ppo_loss(*xs, m), "ppo"),
            kernels_fwd_bwd=kernels_launched(lambda: ppo_step(ppo_loss), "ppo"),
        )

    # ---- token_logprobs -----------------------------------------------------------------------------------
    if want("token_logprobs"):
        N, V = (2048, 50304) if args.quick else (8192, 50304)
        x = torch.randn(N, V, device=dev, dtype=bf)
        t = torch.randint(0, V, (N,), device=dev)
        xg = x.detach().requires_grad_()

        def ours_lp():
            lp, ent = token_logprobs(xg, t, return_entropy=True)
            torch.autograd.grad([lp, ent], xg, [torch.ones_like(lp), torch.ones_like(ent)])  # no accumulation

        ours = cuda_ms(ours_lp, reps)
        gbs = 3 * x.numel() * x.element_size() / ours / 1e6  # two reads and one write of the logits
        row(
            "token_logprobs+ent f+b",
            f"({N}, {V}) bf16",
            "eager log_softmax",
            cuda_ms(lambda: eager_logprobs_fwd_bwd(x, t), reps),
            ours,
            ">= 70% HBM, >= 3x eager",
            GBs=round(gbs),
            hbm_frac=round(gbs / hbm, 3),
        )

    # ---- sample -------------------------------------------------------------------------------------------
    for B, V in ((64, 50304), (256, 128256)) if want("sample") else ():
        x = torch.randn(B, V, device=dev, dtype=bf) * 3
        row(
            "sample top-k50 top-p.9",
            f"({B}, {V}) bf16",
            "torch sort",
            cuda_ms(lambda: torch_sample(x, 50, 0.9), reps),
            cuda_ms(lambda: sample(x, top_k=50, top_p=0.9), reps),
            ">= 3x",
        )
        row(
            "sample top-p.9",
            f"({B}, {V}) bf16",
            "torch sort",
            cuda_ms(lambda: torch_sample(x, V, 0.9), reps),
            cuda_ms(lambda: sample(x, top_p=0.9), reps),
            ">= 3x",
        )

    # ---- causal_attention ---------------------------------------------------------------------------------
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(q, k, v, backend=None, causal=True):
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def fwd_bwd(fn):
        def run():
            out = fn()
            out.backward(dout)

        return run

    Ts = (512, 2048) if args.quick else (512, 1024, 2048, 4096, 8192)
    for D in (64, 128) if want("attention") else ():
        for T in Ts:
            B, H = 16384 // T, 2048 // D
            q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=bf, requires_grad=True) for _ in range(3))
            dout = torch.randn(B, H, T, D, device=dev, dtype=bf)
            flops = 4 * B * H * T * T * D / 2  # causal: half the score matrix
            ours_f = cuda_ms(lambda: causal_attention(q, k, v), reps)
            ours_b = cuda_ms(fwd_bwd(lambda: causal_attention(q, k, v)), reps)
            for name, backend in (("SDPA default", None), ("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION)):
                try:
                    base_f = cuda_ms(lambda: sdpa(q, k, v, backend), reps)
                    base_b = cuda_ms(fwd_bwd(lambda: sdpa(q, k, v, backend)), reps)
                except RuntimeError as exc:  # a backend that does not take this shape
                    print(f"{name} unavailable at T={T} D={D}: {str(exc)[:80]}")
                    continue
                row(
                    "attention fwd",
                    f"T={T} D={D} B={B} H={H}",
                    name,
                    base_f,
                    ours_f,
                    ">= 1.0x; 1.5x at T >= 2k",
                    ours_tflops=round(flops / ours_f / 1e9, 1),
                    base_tflops=round(flops / base_f / 1e9, 1),
                )
                row(
                    "attention fwd+bwd",
                    f"T={T} D={D} B={B} H={H}",
                    name,
                    base_b,
                    ours_b,
                    ">= 1.0x",
                    ours_tflops=round(3.5 * flops / ours_b / 1e9, 1),
                    base_tflops=round(3.5 * flops / base_b / 1e9, 1),
                )
    for Tk in (1024, 4096, 8192) if want("decode") else ():
        B, H, D = 64, 16, 128
        q = torch.randn(B, H, 1, D, device=dev, dtype=bf)
        k, v = (torch.randn(B, H, Tk, D, device=dev, dtype=bf) for _ in range(2))
        ours = cuda_ms(lambda: causal_attention(q, k, v), reps)
        row(
            "attention decode",
            f"Tq=1 Tk={Tk} B={B} H={H}",
            "SDPA default",
            cuda_ms(lambda: sdpa(q, k, v, causal=False), reps),
            ours,
            ">= 1.0x",
            GBs=round(2 * k.numel() * k.element_size() / ours / 1e6),
        )  # K and V read once

    if want("norms"):
        llama_elementwise_rows(row, reps, hbm)

    info = run_info(hbm)
    for r_ in rows:
        print("JSON " + json.dumps({**r_, **info}))
    print(
        f"\nfastrlhf CUDA ops on {info['gpu']} (torch {info['torch']}, d2d copy {hbm:.0f} GB/s; "
        "ratio = baseline / ours, > 1 is faster)"
    )
    print(f"{'op':<24} {'shape':<26} {'baseline':<16} {'base ms':>9} {'ours ms':>9} {'ratio':>7}  goal")
    for r_ in rows:
        print(
            f"{r_['op']:<24} {r_['shape']:<26} {r_['baseline']:<16} {r_['base_ms']:>9.3f} {r_['ours_ms']:>9.3f} "
            f"{r_['ratio']:>6.2f}x  {r_['goal']}  {extras(r_)}"
        )


if __name__ == "__main__":
    main()
