"""Shared benchmark plumbing: medians of repeated runs, machine facts, one table and JSON lines."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

import fastrlhf
import torch


def parse_args(description: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions; the median is reported")
    ap.add_argument("--quick", action="store_true", help="smaller shapes and fewer reps (smoke run)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def median_ms(fn: Callable[[], Any], reps: int = 7, warmup: int = 2, min_time_s: float = 0.05) -> float:
    """Median wall time of fn() in ms; each sample repeats fn enough to last >= min_time_s."""
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, int(min_time_s / once))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner * 1e3)
    return statistics.median(samples)


def interleaved_times(fns: list[Callable[[], Any]], reps: int) -> list[list[float]]:
    """Wall times in ms of each fn over reps rounds, the fns timed alternately (after one warm-up call each):
    on a shared machine the load drifts over seconds, and alternating exposes all of them to the same drift,
    so their ratios stay meaningful."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, out in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return times


def interleaved_ms(fns: list[Callable[[], Any]], reps: int) -> list[float]:
    """The median of each fn's interleaved_times."""
    return [statistics.median(t) for t in interleaved_times(fns, reps)]


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_path": fastrlhf.build_info().get("cpu_path"),
        "commit": commit or "unknown",
    }


def report(title: str, rows: list[dict[str, Any]]) -> None:
    """rows: dicts with op, shape, baseline, base_ms, ours_ms (+ goal, extra keys kept in JSON)."""
    print(f"\n{title}")
    print(f"{'op':<22} {'shape':<28} {'baseline ms':>12} {'ours ms':>10} {'ratio':>8}  goal")
    m = machine()
    for r in rows:
        r["ratio"] = r["base_ms"] / r["ours_ms"]
        print(
            f"{r['op']:<22} {r['shape']:<28} {r['base_ms']:>12.3f} {r['ours_ms']:>10.3f} "
            f"{r['ratio']:>7.1f}x  {r.get('goal', '')}"
        )
    for r in rows:
        print("JSON " + json.dumps({**r, **m}))


def assert_close(name: str, got: Any, want: Any, **tol: float) -> None:
    torch.testing.assert_close(
        got, want, **tol, msg=lambda m: f"{name}: result differs from the reference: {m}"
    )
