"""`python -m fastrlhf grpo|rloo|reinforce_pp`: from an SFT run on the arithmetic task, on a weighted reward
(the task's checker plus a Python function), a run writes its log and checkpoints and a second call resumes
it to the new max_steps; a bad reward source is named."""

import json

import pytest
from fastrlhf.cli import main


def args(algo, sft_run, out, *extra):
    return [
        algo,
        "--quiet",
        f"policy={sft_run}",
        "train.prompts=arithmetic",
        "train.reward=task + 0.5 * helpers.rewards:short",
        f"train.out_dir={out}",
        "train.ckpt_interval=1",
        "train.device=cpu",
        f"{algo}.prompts_per_step=2",
        f"{algo}.group_size=2",
        f"{algo}.minibatch=4",
        f"{algo}.max_new_tokens=4",
        *extra,
    ]


@pytest.mark.parametrize("algo", ["grpo", "rloo", "reinforce_pp"])
def test_a_run_trains_then_resumes(algo, sft_run, tmp_path):
    out = tmp_path / algo
    assert main(args(algo, sft_run, out, "train.max_steps=1")) == 0
    assert main(args(algo, sft_run, out, "train.max_steps=2")) == 0  # resumes at step 1
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "reward_mean" in r]
    assert steps == [1, 2], rows
    assert all(
        0.0 <= r["reward_mean"] <= 1.5 and r["first_ratio_dev"] < 1e-3 for r in rows if "reward_mean" in r
    )
    assert sorted(p.name for p in out.glob("step_*")) == ["step_0000001", "step_0000002"]


def test_a_bad_reward_source_is_named(sft_run, tmp_path, capsys):
    assert main(args("rloo", sft_run, tmp_path, "train.reward=task + helpers.rewards:nothing")) == 2
    assert "module 'helpers.rewards' has no 'nothing'" in capsys.readouterr().err
