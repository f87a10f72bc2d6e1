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
        if Path(t.ptx_data).is_dir():
            raise ValueError(
                f"train.ptx_data = {t.ptx_data} is a folder; give a token file in it (e.g. "
                f"{Path(t.ptx_data) / 'train.bin'}, written by `python -m fastrlhf data`)"
            )
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


def build_grpo(cfg, quiet: bool = False):
    """The GRPO trainer cfg names: the policy (any model source), its prompts (a task's train prompts or a
    file) and its reward (the task's exact scorer, or a reward model's score)."""
    from fastrlhf import from_pretrained, load_tokenizer
    from fastrlhf.data import decode_response, encode_prompt
    from fastrlhf.rl.grpo import GRPOTrainer
    from fastrlhf.tasks.registry import load_task, task_module, task_names
    from fastrlhf.train import dist

    t = cfg.train
    device = dist.setup(t.device, t.threads)
    if not cfg.policy:
        raise ValueError("policy is empty: give a run folder, an HF folder, a .gguf file or a model name")
    policy, tok = from_pretrained(cfg.policy), load_tokenizer(cfg.policy)
    task = t.prompts if t.prompts in task_names() else None
    lines = (
        load_task(task).prompts("train") if task else read_prompts(_need(t.prompts, "train.prompts", "label"))
    )
    prompts = [encode_prompt(tok, x) for x in lines]
    text = {tuple(ids): line for ids, line in zip(prompts, lines)}
    if t.reward == "task":
        if task is None:
            raise ValueError(
                "train.reward = 'task' needs train.prompts to name a task (its scorer rates the answers)"
            )
        score = task_module(task).score

        def reward_fn(ps: list[list[int]], rs: list[list[int]]) -> list[float]:
            return [score(text[tuple(p)], decode_response(tok, r)) for p, r in zip(ps, rs)]
    else:
        rm = load_reward_model(_need(t.reward, "train.reward", "python -m fastrlhf rm"))[0].to(device)
        reward_fn = rm_reward_fn(rm, tok.eot_id)
    ref = from_pretrained(cfg.policy).to(device) if cfg.grpo.beta > 0 else None
    torch.manual_seed(t.seed)
    return GRPOTrainer(
        cfg,
        policy.to(device),
        reward_fn,
        prompts,
        ref=ref,
        eos_token_id=tok.eot_id,
        tokenizer=tok,
        quiet=quiet,
    )


def rm_reward_fn(rm, pad_id: int):
    """reward_fn(prompts, responses) of a reward model: its score at each answer's last token."""
    from fastrlhf.models import left_pad_layout

    @torch.no_grad()
    def reward_fn(ps: list[list[int]], rs: list[list[int]]) -> torch.Tensor:
        seqs = [p + r for p, r in zip(ps, rs)]
        T = max(map(len, seqs))
        idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
        real = torch.zeros(len(seqs), T, dtype=torch.long)
        for b, s in enumerate(seqs):
            idx[b, T - len(s) :], real[b, T - len(s) :] = torch.tensor(s), 1
        positions, segments = left_pad_layout(real)
        device = next(rm.parameters()).device
        last = torch.full((len(seqs),), T - 1)
        return (
            rm.score(
                idx.to(device),
                last.to(device),
                positions=positions.to(device),
                segment_ids=segments.to(device),
            )
            .float()
            .cpu()
        )

    return reward_fn
