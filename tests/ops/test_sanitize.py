"""The CPU ops under AddressSanitizer + UndefinedBehaviorSanitizer (issue 22): scripts/sanitize.sh builds
_C with FASTRLHF_SANITIZE=ON into build/sanitize and runs every op's tests against it (and the fuzz tests
on the baseline-ISA kernels too); any report fails. About 1 min of CPU to build from cold (then
incremental) and 2.5 min to run on 2 busy cores.
Skipped only where the compiler has no sanitizer runtimes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "sanitize.sh"
CXX = os.environ.get("CXX", "g++")


def has_runtimes() -> bool:
    if not shutil.which(CXX):
        return False
    for lib in ("libasan.so", "libubsan.so"):
        path = subprocess.run(
            [CXX, f"-print-file-name={lib}"], check=False, capture_output=True, text=True
        ).stdout.strip()
        if not os.path.isabs(path):  # the compiler echoes the bare name when it has no such file
            return False
    return True


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not has_runtimes(), reason=f"{CXX} has no libasan/libubsan"),
]


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        [str(SCRIPT), *args], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200
    )


def test_harness_reports_a_use_after_free():
    """The harness is live: _C carries ASan and UBSan instrumentation, and a bad read aborts with a
    report (so a clean run below means something)."""
    r = run("--canary")
    out = r.stdout + r.stderr
    assert "_C is instrumented" in out, out[-4000:]
    assert r.returncode != 0 and "ERROR: AddressSanitizer: heap-use-after-free" in out, out[-4000:]


def test_cpu_ops_have_no_sanitizer_reports():
    r = run()
    out = r.stdout + r.stderr
    reports = [line for line in out.splitlines() if "AddressSanitizer" in line or "runtime error:" in line]
    assert not reports, "\n".join(reports[:20]) + "\n" + out[-6000:]
    assert r.returncode == 0, out[-6000:]
    assert " passed" in out and " failed" not in out, out[-2000:]
