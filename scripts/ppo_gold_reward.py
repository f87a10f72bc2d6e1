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
import math
from pathlib import Path

import torch
from fastrlhf.data import decode_response, encode_prompt
from fastrlhf.model import generate
from fastrlhf.train.checkpoint import load_gpt
from fastrlhf.train.config import from_dict, merge, parse_overrides
from fastrlhf.train.evaluate import true_scorer
from fastrlhf.train.pipeline import PipelineConfig, Run
from fastrlhf.train.ppo import PPOTrainer
from fastrlhf.train.ppo_cli import build_trainer
from fastrlhf.train.stages import _task


def load_run_config(run: Path, overrides: list[str]) -> PipelineConfig:
    """RUN/config.json (written by the pipeline) with the overrides on top."""
    path = run / "config.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: RUN must be a pipeline run folder (python -m fastrlhf pipeline)")
    data = merge(json.loads(path.read_text()), parse_overrides(overrides))
    return PipelineConfig(**{name: from_dict(f.default_factory().__class__, data[name])
                             for name, f in PipelineConfig.__dataclass_fields__.items()})


@torch.no_grad()
def held_out_scores(run: Run, policy: torch.nn.Module) -> dict[str, list[float]]:
    """True score of the SFT model's and the policy's answer to each held-out prompt, as the eval stage."""
    cfg, p = run.cfg, run.cfg.ppo.ppo
    sft, tok = load_gpt(run.dir("sft"))
    prompts = _task(run).prompts("heldout")[: cfg.eval.prompts]
    score, out = true_scorer(cfg.run.task), {"sft": [], "gold": []}
    for model in (sft, policy):
        model.eval()
    for i in range(0, len(prompts), cfg.eval.batch):
        chunk = prompts[i : i + cfg.eval.batch]
        ids = [encode_prompt(tok, x) for x in chunk]
        for who, model in (("sft", sft), ("gold", policy)):
            g = torch.Generator().manual_seed(cfg.eval.seed + i)  # the eval stage's seed for this chunk
            gen = generate(model, ids, p.max_new_tokens, temperature=p.temperature, eos_token_id=tok.eot_id,
                           generator=g)
            for prompt, resp, mask in zip(chunk, gen.responses.tolist(), gen.response_mask.tolist()):
                out[who].append(score(prompt, decode_response(tok, [t for t, m in zip(resp, mask) if m])))
    return out


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
    cfg.train.prompts, cfg.train.out_dir = str(run.dir("ppo") / "prompts.txt"), a.out or str(run_dir / "ppo_gold")
    cfg.train.device, cfg.train.threads = run.cfg.run.device, run.cfg.run.threads
    loaded = build_trainer(cfg, true_score=true_scorer(run.cfg.run.task))  # models, prompts, checks
    # the gold score is the reward; the value model then starts from the policy's trunk
    trainer = PPOTrainer(cfg, loaded.policy, loaded.ref, loaded.true_score, loaded.prompts, eos_token_id=loaded.eos,
                         tokenizer=loaded.tokenizer, true_score=loaded.true_score)
    trainer.train()
    scores = held_out_scores(run, trainer.policy)
    n = len(scores["sft"])
    diff = [g - s for g, s in zip(scores["gold"], scores["sft"])]
    mean = sum(diff) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diff) / max(n - 1, 1) / n)
    sft, gold = sum(scores["sft"]) / n, sum(scores["gold"]) / n
    print(f"\n| held-out prompts | SFT | PPO, gold reward | gain (paired SE) |\n| --- | --- | --- | --- |\n"
          f"| {n} | {sft:.3f} | {gold:.3f} | {mean:+.3f} +- {se:.3f} |")
    print(json.dumps({"run": str(run_dir), "prompts": n, "sft": sft, "ppo_gold": gold, "gain": mean, "gain_se": se,
                      "overrides": a.overrides}))


if __name__ == "__main__":
    main()
