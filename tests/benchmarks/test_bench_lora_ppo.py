"""bench_lora_ppo.py's smoke run at a tiny depth: three child processes each run one PPO step, the ratio
check validated, and the LoRA step holds less memory than either full fine-tuning setup."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_lora_ppo.py"


def test_smoke_run_validates_and_reports():
    args = [
        "--layers",
        "1",
        "--batch",
        "2",
        "--prompt-len",
        "8",
        "--new-tokens",
        "4",
        "--threads",
        "1",
        "--vocab",
        "512",
    ]
    out = subprocess.run(
        [sys.executable, str(BENCH), *args], check=True, capture_output=True, text=True
    ).stdout
    assert "validated: every setup keeps ratio == 1" in out
    row = json.loads(next(line for line in out.splitlines() if line.startswith("JSON "))[5:])
    lora = row["LoRA r16, value on the policy"]["peak_mib"]
    assert 0 < lora < row["full, value on the policy"]["peak_mib"] < row["full, value separate"]["peak_mib"]
    one_base = row["LoRA r16, RM + critic on one base"]["peak_mib"]
    assert 0 < one_base < row["full, value separate"]["peak_mib"] and 0 < row["one_base_over_full"] < 1
