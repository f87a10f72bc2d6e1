"""bench_grpo.py's smoke test at tiny shapes without TRL: it validates our trainer (ratio == 1 at the first
minibatch, full-length answers) and prints its table and JSON line. The TRL comparison needs trl, which the
test extra does not install; its prompt text must encode back to the same ids (checked when trl is there)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_grpo

TINY = ["--prompts", "2", "--samples", "2", "--prompt-len", "5", "--new", "4", "--n-layer", "1"]
TINY += ["--n-head", "2", "--n-embd", "16", "--vocab", "31", "--reps", "2", "--threads", "1"]


def test_runs_at_tiny_shapes_without_trl(capsys):
    ours = bench_grpo.main(["--trl", "off", *TINY])
    out = capsys.readouterr().out
    assert "validated: metrics finite, answers 4 tokens" in out
    row = json.loads(next(line for line in out.splitlines() if line.startswith("JSON "))[5:])
    assert row["op"] == "grpo step" and row["shape"] == "P2 G2 Tp5 Tr4" and row["ours_ms"] > 0
    assert ours["total"] == pytest.approx(row["ours_ms"]) and ours["generate"] > 0 and ours["train"] > 0


def test_the_reward_counts_the_fives():
    assert bench_grpo.fives(None, [[5, 5, 1, 2], [3], []]) == [0.5, 0.0, 0.0]


def test_the_tokenizer_round_trips_every_id():
    pytest.importorskip("transformers")
    tok = bench_grpo.tokenizer(31)
    ids = list(range(1, 30))
    assert tok(" ".join(tok.convert_ids_to_tokens(ids)))["input_ids"] == ids
