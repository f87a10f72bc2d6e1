"""Step 3 of the recipe, PPO with PPO-ptx, from checkpoints (InstructGPT section 3.5):

    python -m fastrlhf ppo --config configs/ppo_arithmetic.toml [section.field=value ...]

[models] names the SFT checkpoint (policy and reference) and the reward model checkpoint (reward and,
by default, the value model's start); [train] prompts is a text file with one prompt per line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from fastrlhf.data.prompts import read_prompts
from fastrlhf.models import GPT
from fastrlhf.rl.config import PPOConfig
from fastrlhf.rl.ppo import PPOTrainer
from fastrlhf.train.reward import load_reward_model


def _need(path: str, field: str, command: str) -> str:
    if not path:
        raise ValueError(f"{field} is empty: give the folder that `{command}` wrote")
    if not Path(path).exists():
        raise FileNotFoundError(f"{field} = {path} does not exist: run `{command}` first")
    return path


def build_trainer(
    cfg: PPOConfig,
    quiet: bool = False,
    true_score: Callable[[str, str], float] | None = None,
    gold_reward: bool = False,
) -> PPOTrainer:
    """Load the four models, the prompts and the PPO-ptx tokens that cfg names; returns the trainer.
    true_score(prompt, response), e.g. a task's checker, is logged per step as `true_score` (never trained on).
    gold_reward: train on true_score instead of models.reward, which is not loaded; without models.value the
    value model starts from the policy's trunk (an RM's scale would not fit): what a perfect RM allows."""
    if gold_reward and true_score is None:  # checked before anything is loaded
        raise ValueError("gold_reward=True trains on true_score: pass one")
    from fastrlhf.data import TokenFile, decode_response, encode_prompt
    from fastrlhf.models.load import load_model
    from fastrlhf.train import dist

    t, m = cfg.train, cfg.models
    device = dist.setup(t.device, t.threads)  # under torchrun: joins the process group, this rank's device
    policy, tok = load_model(_need(m.policy, "models.policy", "python -m fastrlhf sft"))
    if tok is None:
        raise ValueError(f"models.policy = {m.policy} has no tokenizer/ folder to encode prompts with")
    ref: GPT = (
        load_model(_need(m.ref, "models.ref", "python -m fastrlhf sft"))[0]
        if m.ref
        else load_model(m.policy)[0]
    )
    reward, reward_tok, value = None, None, None
    if not gold_reward:
        reward, reward_tok = load_reward_model(_need(m.reward, "models.reward", "python -m fastrlhf rm"))
        if reward_tok is None:
            raise ValueError(
                f"models.reward = {m.reward} has no tokenizer/ folder; cannot check it matches the policy's"
            )
    if cfg.ppo.value_model == "separate" and m.value:
        value = load_reward_model(_need(m.value, "models.value", "python -m fastrlhf rm"))[0]
    lines = read_prompts(_need(t.prompts, "train.prompts", "python -m fastrlhf label"), "train.prompts")
    prompts = [encode_prompt(tok, x) if t.chat else tok.encode(x) for x in lines]
    ptx = None
    if cfg.ppo.ptx_coef > 0:
        ptx = TokenFile(_need(t.ptx_data, "train.ptx_data", "python -m fastrlhf data")).tokens
    torch.manual_seed(t.seed)
    models = [x.to(device) if x is not None else None for x in (policy, ref, reward, value)]
    truth = None
    if true_score is not None:  # the trainer hands over ids: map them back to the file's text
        text = {tuple(ids): line for ids, line in zip(prompts, lines)}

        def truth(ps: list[list[int]], rs: list[list[int]]) -> list[float]:
            return [true_score(text[tuple(p)], decode_response(tok, r)) for p, r in zip(ps, rs)]

    reward_or_fn = truth if gold_reward else models[2]
    return PPOTrainer(
        cfg,
        models[0],
        models[1],
        reward_or_fn,
        prompts,
        value_model=models[3],
        eos_token_id=tok.eot_id,
        tokenizer=tok,
        reward_tokenizer=reward_tok,
        ptx_tokens=ptx,
        quiet=quiet,
        true_score=truth,
    )
