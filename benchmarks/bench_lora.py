"""LoRA against full fine-tuning at SmolLM2-135M's shape (random init), both ours, same process, same
threads: a training step (forward, backward, AdamW) with r 16 adapters on every linear (q, k, v, o, gate,
up, down) against the same step updating every weight, and each step's peak memory in a fresh child
process. Validates first (equal losses at the start, where B = 0). Ratio = full / LoRA (higher is better)."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import torch
from _common import interleaved_times, machine, report
from bench_llama import SMOLLM2, _status_kib
from fastrlhf.models.config import LlamaConfig
from fastrlhf.models.llama import LlamaForCausalLM
from fastrlhf.models.lora import LoraConfig, add_lora
from fastrlhf.train.optim import OptimConfig, make_adamw


def step_fn(lora: bool, cfg: LlamaConfig, x: torch.Tensor):
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).train()
    if lora:
        add_lora(model, LoraConfig(r=16, alpha=32.0))
    opt = make_adamw(model, OptimConfig())  # the frozen base has requires_grad False: no state for it
    y = torch.roll(x, -1, 1)
    y[:, -1] = -100

    def step():
        loss = model(x, y)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def peak_child(which: str, args) -> None:
    cfg = LlamaConfig(**{**SMOLLM2, "n_layer": args.layers})
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    step = step_fn(which == "lora", cfg, x)
    step()  # optimizer state allocated: measure the second step
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step()
    print(json.dumps({"peak_mib": (_status_kib("VmHWM") - base) / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--peak-child", choices=("lora", "full"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_child:
        return peak_child(args.peak_child, args)
    cfg = LlamaConfig(**{**SMOLLM2, "n_layer": args.layers})
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    full, lora = step_fn(False, cfg, x), step_fn(True, cfg, x)
    torch.testing.assert_close(full(), lora(), atol=1e-5, rtol=1e-5)  # same weights, B = 0: the same loss
    print("validated: equal first losses")
    times = interleaved_times([full, lora], args.reps)
    base, mine = [statistics.median(t) for t in times]
    peaks = {}
    for which in ("full", "lora"):
        cmd = [
            sys.executable,
            __file__,
            "--peak-child",
            which,
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
            "--layers",
            str(args.layers),
        ] + (["--threads", str(args.threads)] if args.threads else [])
        peaks[which] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)[
            "peak_mib"
        ]
    report(
        f"LoRA r16 on all linears vs full fine-tuning, SmolLM2-135M shape ({args.layers} layers)",
        [
            dict(
                op="train step",
                shape=f"B{args.batch} T{args.seq}",
                baseline="full fine-tuning (ours)",
                base_ms=base,
                ours_ms=mine,
                goal=">= 1.4x",
                paired_ratio=statistics.median(b / o for b, o in zip(*times)),
                peak_mib_full=peaks["full"],
                peak_mib_lora=peaks["lora"],
            )
        ],
    )
    print(
        f"peak memory of a step: full {peaks['full']:.0f} MiB, LoRA {peaks['lora']:.0f} MiB "
        f"({peaks['lora'] / peaks['full']:.2f}x); {json.dumps(machine())}"
    )


if __name__ == "__main__":
    main()
