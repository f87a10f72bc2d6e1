"""token_logprobs: the streaming kernel vs eager log_softmax + gather + entropy + autograd.

Also measures the peak extra memory of one forward+backward (resident set growth in a fresh
process), which for the fused op should be about the one (N, V) gradient.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from _common import assert_close, median_ms, parse_args, report
from fastrlhf.ops import reference, token_logprobs


def eager(logits, targets, return_entropy=True):
    """The baseline as PPO trainers write it (TRL's logprobs_from_logits + entropy_from_logits)."""
    logp = torch.log_softmax(logits, dim=-1)  # (N, V)
    lp = logp.gather(-1, targets[:, None]).squeeze(-1)  # (N,)
    if not return_entropy:
        return lp
    return lp, -(logp.exp() * logp).sum(-1)  # (N,)


def fwd_bwd(fn, logits, targets, return_entropy=True):
    x = logits.detach().requires_grad_()
    out = fn(x, targets, return_entropy=return_entropy)
    out = out if return_entropy else (out,)
    (grad,) = torch.autograd.grad(sum(o.sum() for o in out), x)
    return (*out, grad)


def validate(logits, targets):
    rows = slice(0, 16)  # float64 reference on a slice; the full shape is checked against eager
    want = fwd_bwd(reference.token_logprobs, logits[rows].double(), targets[rows])
    got = fwd_bwd(token_logprobs, logits[rows], targets[rows])
    assert_close("token_logprobs vs float64 reference", [g.double() for g in got], want, rtol=1e-5, atol=1e-6)
    assert_close("token_logprobs vs eager", fwd_bwd(token_logprobs, logits, targets),
                 fwd_bwd(eager, logits, targets), rtol=1e-4, atol=1e-5)  # fmt: skip


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def peak_extra_mb(which: str, N: int, V: int) -> float:
    """Peak resident-set growth of one forward+backward with entropy, in a fresh process (MB):
    the high-water mark (VmHWM) is reset just before the call, so nothing earlier counts."""
    code = (
        f"import torch, sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
        "import bench_logprobs as b\n"
        "from fastrlhf.ops import token_logprobs\n"
        f"x = torch.randn({N}, {V}); t = torch.randint(0, {V}, ({N},))\n"
        f"fn = {'token_logprobs' if which == 'ours' else 'b.eager'}\n"
        "b.fwd_bwd(fn, x[:2], t[:2])  # lazy initialisation happens here, not below\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # reset VmHWM to the current RSS\n"
        "before = b._status_mb('VmRSS')\n"
        "out = b.fwd_bwd(fn, x, t)\n"
        "print(b._status_mb('VmHWM') - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def time_fwd_bwd(logits, targets, ent: bool, reps: int) -> tuple[float, float]:
    base = median_ms(lambda: fwd_bwd(eager, logits, targets, ent), reps=reps, warmup=1)
    ours = median_ms(lambda: fwd_bwd(token_logprobs, logits, targets, ent), reps=reps, warmup=1)
    return base, ours


def run(args) -> list[dict]:
    N, V = (256, 50304) if args.quick else (2048, 50304)
    logits, targets = torch.randn(N, V), torch.randint(0, V, (N,))
    validate(logits, targets)
    shape = f"({N}, {V})"
    reps = min(args.reps, 5)  # the eager baseline takes seconds per call
    rows = []
    for ent, goal in ((True, ">= 4x"), (False, "")):
        base, ours = time_fwd_bwd(logits, targets, ent, reps)
        name = "logprobs+ent fwd+bwd" if ent else "logprobs fwd+bwd"
        rows.append(
            {"op": name, "shape": shape, "baseline": "eager + autograd", "base_ms": base,
             "ours_ms": ours, "goal": goal}
        )  # fmt: skip
    with torch.no_grad():
        base = median_ms(lambda: eager(logits, targets), reps=reps, warmup=1)
        ours = median_ms(lambda: token_logprobs(logits, targets, return_entropy=True), reps=reps, warmup=1)
    rows.append(
        {
            "op": "logprobs+ent fwd",
            "shape": shape,
            "baseline": "eager, no_grad",
            "base_ms": base,
            "ours_ms": ours,
        }
    )
    grad_mb = N * V * 4 / 2**20
    mem = {w: peak_extra_mb(w, N, V) for w in ("ours", "eager")}
    rows[0].update(peak_extra_mb_ours=round(mem["ours"]), peak_extra_mb_eager=round(mem["eager"]),
                   grad_mb=round(grad_mb))  # fmt: skip
    print(f"peak extra memory, fwd+bwd with entropy: ours {mem['ours']:.0f} MB, eager {mem['eager']:.0f} MB "
          f"(one (N, V) fp32 gradient = {grad_mb:.0f} MB)")  # fmt: skip
    return rows


if __name__ == "__main__":
    args = parse_args(__doc__)
    rows = run(args)
    print("all results match the reference")
    report("token_logprobs (fp32; ratio = baseline / ours)", rows)
