"""causal_attention: the fused CPU kernel vs F.scaled_dot_product_attention(is_causal=True), fp32.

Forward alone (no grad) and forward + backward. Validates against ops.reference first. With --memory,
also measures the peak RSS growth of one forward + backward (in a fresh process) at growing T: it
grows linearly in T (the kernel's scratch is O(T * D), never O(T^2)).
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import torch
import torch.nn.functional as F
from _common import assert_close, interleaved_ms, parse_args, report
from fastrlhf.ops import causal_attention, reference

GOALS = {  # (B, H, T, D): (forward goal, forward + backward goal) as ratios SDPA / ours
    (4, 12, 1024, 64): (">= 1.0x", ">= 1.0x"),
    (1, 12, 2048, 64): (">= 1.0x", ">= 1.0x"),
    (8, 6, 256, 64): (">= 1.0x", ">= 1.3x"),
}


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def fwd_bwd(fn, q, k, v, dout):
    def step():
        q.grad = k.grad = v.grad = None
        fn(q, k, v).backward(dout)

    return step


def validate(q, k, v, dout) -> None:
    """ours and SDPA, forward and gradients, against the fp32 reference."""
    want = [reference.causal_attention(q, k, v)]
    want += torch.autograd.grad(want[0], (q, k, v), dout)
    for name, fn in (("causal_attention", causal_attention), ("sdpa", sdpa)):
        got = [fn(q, k, v)]
        got += torch.autograd.grad(got[0], (q, k, v), dout)
        for part, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            assert_close(f"{name} {part}", a, b, rtol=1e-4, atol=1e-5)


def run(args) -> list[dict]:
    rows = []
    shapes = [(2, 4, 256, 64), (2, 2, 512, 64)] if args.quick else list(GOALS)
    for B, H, T, D in shapes:
        q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
        dout = torch.randn(B, H, T, D)
        validate(q, k, v, dout)
        goal_f, goal_fb = GOALS.get((B, H, T, D), ("", ""))
        shape = f"({B}, {H}, {T}, {D})"
        with torch.no_grad():
            base, ours = interleaved_ms(
                [functools.partial(sdpa, q, k, v), functools.partial(causal_attention, q, k, v)], args.reps
            )
        row = {"shape": shape, "baseline": "SDPA is_causal"}
        rows.append({"op": "attention fwd", **row, "base_ms": base, "ours_ms": ours, "goal": goal_f})
        base, ours = interleaved_ms(
            [fwd_bwd(sdpa, q, k, v, dout), fwd_bwd(causal_attention, q, k, v, dout)], args.reps
        )
        rows.append({"op": "attention fwd+bwd", **row, "base_ms": base, "ours_ms": ours, "goal": goal_fb})
    return rows


MEMORY_PROBE = """
import sys, torch
from fastrlhf.ops import causal_attention

def status(key):  # kB
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))

for T in map(int, sys.argv[1:]):
    for attempt in range(2):  # the first call also grows thread arenas and stacks: report the second
        q, k, v = (torch.randn(1, 1, T, 64, requires_grad=True) for _ in range(3))
        dout = torch.randn(1, 1, T, 64)
        before = status("VmRSS")
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS (VmHWM)
        causal_attention(q, k, v).backward(dout)
        growth = (status("VmHWM") - before) / 1024
        del q, k, v, dout
    print(T, growth)
"""


def memory_table() -> None:
    """Peak RSS growth of one forward + backward at B=1, H=1, D=64, in a fresh process: the outputs
    (out, dq, dk, dv: 4 x T x D fp32 = 1 KiB per position) plus the kernel's scratch, a few 64 x 64
    tiles per thread (and only in the one-pass backward, not taken here as B * Hkv = 1 < threads, a
    (G, Tq, Dp) fp32 dQ accumulator per task). A (T, T) fp32 score matrix is shown for scale."""
    Ts = (2048, 4096, 8192, 16384)
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, *map(str, Ts)], capture_output=True, text=True, check=True
    ).stdout
    print("\npeak RSS growth of one fwd+bwd, B=1, H=1, D=64 (expected: ~1 KiB per position)")
    print(f"{'T':>6} {'MiB':>8} {'KiB per position':>17} {'(T, T) fp32 MiB':>16}")
    for line in out.splitlines():
        T, mib = int(line.split()[0]), float(line.split()[1])
        print(f"{T:>6} {mib:>8.1f} {mib * 1024 / T:>17.2f} {T * T * 4 / 2**20:>16.0f}")
        print("JSON " + json.dumps({"op": "attention memory", "T": T, "peak_rss_growth_mib": mib}))


if __name__ == "__main__":
    sys.argv, memory = [a for a in sys.argv if a != "--memory"], "--memory" in sys.argv
    args = parse_args(__doc__)
    rows = run(args)
    print("all results match the reference")
    report("causal_attention vs SDPA (fp32; ratio = SDPA / ours)", rows)
    if memory:
        memory_table()
