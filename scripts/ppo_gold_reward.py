"""PPO against the task's true score instead of the reward model: what a perfect RM would let PPO reach.

    .venv/bin/python scripts/ppo_gold_reward.py runs/arithmetic [--out DIR] [overrides, e.g. ppo.optim.lr=1e-4]

Starts from a finished pipeline run's SFT model and settings (RUN/config.json, then the overrides), trains the
policy for ppo.train.max_steps with the true score (1/0 for a sum, VADER for sentiment) as the reward and a
value model built from the policy (the trainer's choice for a reward function, since the RM's scale does not
fit the gold one), then answers the pipeline's held-out prompts with the SFT model and the new policy, with
the evaluation stage's seeds: the SFT column equals RUN/report.md's. The gain over SFT bounds what the RM
could add; a gain far above the run's own says the RM, not PPO, is the limit. Nothing in RUN is changed.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from fastrlhf.config import merge, parse_overrides
from fastrlhf.pipeline.config import PipelineConfig, config_from_dict
from fastrlhf.pipeline.evaluate import answer_and_score
from fastrlhf.pipeline.folder import Run
from fastrlhf.pipeline.stages import _task, eval_metrics
from fastrlhf.rl.build import build_trainer
from fastrlhf.tasks.registry import task_module


def load_run_config(run: Path, overrides: list[str]) -> PipelineConfig:
    """RUN/config.json (written by the pipeline) with the overrides on top."""
    path = run / "config.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: RUN must be a pipeline run folder (python -m fastrlhf pipeline)")
    return config_from_dict(merge(json.loads(path.read_text()), parse_overrides(overrides)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a finished pipeline run folder (its config.json, sft/ and rm/ are read)")
    p.add_argument("--out", help="where the gold-reward PPO run goes (default: RUN/ppo_gold)")
    p.add_argument("overrides", nargs="*", help="pipeline config overrides, e.g. ppo.optim.lr=1e-4")
    a = p.parse_intermixed_args()
    run_dir = Path(a.run)
    run = Run(run_dir, load_run_config(run_dir, a.overrides))
    for stage in ("sft", "rm", "ppo"):  # ppo/prompts.txt: the exact prompts the run's PPO stage drew from
        if not (run.dir(stage) / "DONE.json").is_file():
            raise SystemExit(f"{run.dir(stage)} is not finished: run the pipeline on {run_dir} first")
    cfg = copy.deepcopy(run.cfg.ppo)
    cfg.models.policy, cfg.models.reward = str(run.dir("sft")), str(run.dir("rm"))
    cfg.train.prompts, cfg.train.out_dir = (
        str(run.dir("ppo") / "prompts.txt"),
        a.out or str(run_dir / "ppo_gold"),
    )
    cfg.train.device, cfg.train.threads = run.cfg.run.device, run.cfg.run.threads
    # the gold score is the reward; the value model then starts from the policy's trunk
    trainer = build_trainer(cfg, true_score=task_module(run.cfg.run.task).score, gold_reward=True)
    trainer.train()
    # the evaluation stage's prompts, seeds and metrics, with the gold-reward policy in PPO's place
    prompts = _task(run).prompts("heldout")[: run.cfg.eval.prompts]
    m = eval_metrics(answer_and_score(run, prompts, policies={"ppo": trainer.policy}))
    n, sft, gold, mean, se = len(prompts), m["sft_score"], m["ppo_score"], m["gain"], m["gain_sem"]
    print(
        f"\n| held-out prompts | SFT | PPO, gold reward | gain (paired SE) |\n| --- | --- | --- | --- |\n"
        f"| {n} | {sft:.3f} | {gold:.3f} | {mean:+.3f} +- {se:.3f} |"
    )
    print(
        json.dumps(
            {
                "run": str(run_dir),
                "prompts": n,
                "sft": sft,
                "ppo_gold": gold,
                "gain": mean,
                "gain_se": se,
                "overrides": a.overrides,
            }
        )
    )


if __name__ == "__main__":
    main()
