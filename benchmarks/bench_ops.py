"""Every fused op: validate against the reference, then time ours vs the PyTorch baseline.

Each bench_<op>.py module runs alone too; this script runs them all and prints one table.
"""

from __future__ import annotations

import importlib

from _common import parse_args, report

MODULES = [
    "bench_gae",
    "bench_attention",
    "bench_sample",
    "bench_logprobs",
    "bench_ppo_loss",
    "bench_policy_loss",
    "bench_linear",
    "bench_linear_ce",
    "bench_gelu",
    "bench_norms",
]

if __name__ == "__main__":
    args = parse_args(__doc__)
    rows = []
    for name in MODULES:
        rows += importlib.import_module(name).run(args)
    print("all results match the reference")
    report("fastrlhf ops on CPU (fp32; ratio = baseline / ours)", rows)
