"""bench_dpo.py's smoke run: tiny shapes, TRL off; it validates our loss against the plain pairwise
computation (24 full forwards for the 6 pairs) before it times anything, and prints one JSON line."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from bench_dpo import main, make_models, make_ranking, plain_pairwise_loss


def test_smoke_run_validates_and_reports(capsys):
    main(["--quick", "--trl", "off"])
    out = capsys.readouterr().out
    assert "all results match" in out
    row = json.loads(next(line for line in out.splitlines() if line.startswith("JSON "))[5:])
    assert row["op"] == "dpo_step ref cached" and row["ours_ms"] > 0


def test_the_plain_computation_sees_a_wrong_pair_order():
    """The validation can fail: swapping a ranking's order changes the plain pairwise loss."""
    policy, ref = make_models(64, 16, 1, 32)
    e = make_ranking(9, 7, 64)
    swapped = make_ranking(9, 7, 64)
    swapped.pairs = [(w, b) for b, w in e.pairs]
    assert (
        abs(plain_pairwise_loss(policy, ref, e).item() - plain_pairwise_loss(policy, ref, swapped).item())
        > 1e-3
    )
