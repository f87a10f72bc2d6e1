"""The online trainers built from their configs. Step 3 of the recipe, PPO with PPO-ptx, from checkpoints
(InstructGPT section 3.5):

    python -m fastrlhf ppo --config configs/ppo_arithmetic.toml [section.field=value ...]

[models] names the SFT checkpoint (policy and reference) and the reward model checkpoint (reward and,
by default, the value model's start); [train] prompts is a text file with one prompt per line.
The critic-free ones (build_critic_free: grpo, rloo, reinforce_pp) take any model source as the policy
and a reward from rl/rewards.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from fastrlhf.data.prompts import read_prompts
from fastrlhf.models.load import load_scalar_model
from fastrlhf.models.lora import lora_layers, merge_and_unload, share_base
from fastrlhf.rl.config import PPOConfig
from fastrlhf.rl.ppo import PPOTrainer
from fastrlhf.rl.rewards import WeightedReward, import_function, is_function, parse_reward, rm_reward_fn
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
    ref = (  # with LoRA and no models.ref: the policy's own base, its adapters off (trainer)
        load_model(_need(m.ref, "models.ref", "python -m fastrlhf sft"))[0]
        if m.ref
        else (None if cfg.lora.r else load_model(m.policy)[0])
    )
    reward, reward_tok, value = None, None, None
    if not gold_reward:
        reward, reward_tok = load_scalar_model(
            _need(m.reward, "models.reward", "python -m fastrlhf rm"), merge=not cfg.lora.r
        )
        if reward_tok is None:
            raise ValueError(
                f"models.reward = {m.reward} has no tokenizer/ folder; cannot check it matches the policy's"
            )
        # a LoRA reward model trained on the policy's base keeps its adapters on the policy's own base weights
        # (one copy for policy, reference, reward model and, copied from it, the critic); any other is merged
        if lora_layers(reward.trunk) and not share_base(reward.trunk, policy):
            merge_and_unload(reward.trunk)
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
    if cfg.lora.r:
        from fastrlhf.models.lora import add_lora

        add_lora(policy, cfg.lora)
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


def critic_free_algorithms() -> dict[str, tuple[type, type]]:
    """name -> (config class, trainer class) of the critic-free algorithms (one TOML section each)."""
    from fastrlhf.rl.grpo import GRPOConfig, GRPOTrainer
    from fastrlhf.rl.reinforce_pp import ReinforcePPConfig, ReinforcePPTrainer
    from fastrlhf.rl.rloo import RLOOConfig, RLOOTrainer

    return {
        "grpo": (GRPOConfig, GRPOTrainer),
        "rloo": (RLOOConfig, RLOOTrainer),
        "reinforce_pp": (ReinforcePPConfig, ReinforcePPTrainer),
    }


def build_critic_free(
    cfg,
    quiet: bool = False,
    *,
    lines: list[str] | None = None,
    task_score: Callable[[str, str], float] | None = None,
    true_score: Callable[[str, str], float] | None = None,
):
    """The GRPO / RLOO / REINFORCE++ trainer cfg names (the algorithm follows cfg's class): the policy (any
    model source), its prompts (a task's train prompts or a file; or `lines`, e.g. the pipeline's) and its
    reward (train.reward: the task's exact scorer, a reward model, a Python function, several weighted;
    `task_score` replaces the task's scorer). true_score(prompt, response) is logged, never trained on."""
    from fastrlhf import from_pretrained, load_tokenizer
    from fastrlhf.data import encode_prompt
    from fastrlhf.models.lora import add_lora
    from fastrlhf.tasks.registry import load_task, task_module, task_names
    from fastrlhf.train import dist

    trainers = {c: t for c, t in critic_free_algorithms().values()}
    if type(cfg) not in trainers:
        raise ValueError(f"cfg must be one of {[c.__name__ for c in trainers]}; got {type(cfg).__name__}")
    t = cfg.train
    device = dist.setup(t.device, t.threads)
    if not cfg.policy:
        raise ValueError("policy is empty: give a run folder, an HF folder, a .gguf file or a model name")
    terms = parse_reward(t.reward)  # a malformed reward fails before any model is loaded
    policy, tok = from_pretrained(cfg.policy), load_tokenizer(cfg.policy)
    task = t.prompts if t.prompts in task_names() else None
    if lines is None:
        lines = (
            load_task(task).prompts("train")
            if task
            else read_prompts(_need(t.prompts, "train.prompts", "python -m fastrlhf label"), "train.prompts")
        )
    prompts = [encode_prompt(tok, x) for x in lines]
    text = _as_text(tok, prompts, lines)
    sources = []
    for weight, source in terms:
        if source == "task":
            if task_score is None and task is None:
                raise ValueError(
                    "train.reward 'task' needs train.prompts to name a task (its scorer rates the answers)"
                )
            score = task_score or task_module(task).score
            fn = text(lambda ps, rs, score=score: [score(p, r) for p, r in zip(ps, rs)])
        elif is_function(source):
            fn = text(import_function(source))
        else:
            rm = load_reward_model(_need(source, "train.reward", "python -m fastrlhf rm"))[0].to(device)
            fn = rm_reward_fn(rm, tok.eot_id)
        sources.append((source, weight, fn))
    reward_fn = WeightedReward(sources)  # one source too: its wrong counts and NaNs are named
    # with LoRA the reference is the policy's own base (adapters off): no second copy
    ref = from_pretrained(cfg.policy).to(device) if cfg.hyper.uses_ref() and not cfg.lora.r else None
    truth = text(lambda ps, rs: [true_score(p, r) for p, r in zip(ps, rs)]) if true_score else None
    torch.manual_seed(t.seed)
    if cfg.lora.r:
        add_lora(policy, cfg.lora)
    return trainers[type(cfg)](
        cfg,
        policy.to(device),
        reward_fn,
        prompts,
        ref=ref,
        eos_token_id=tok.eot_id,
        tokenizer=tok,
        quiet=quiet,
        true_score=truth,
    )


def _as_text(tok, prompts: list[list[int]], lines: list[str]):
    """Wraps fn(prompt texts, response texts) into a reward_fn on token ids (the pool's prompts only)."""
    from fastrlhf.data import decode_response

    by_ids = {tuple(ids): line for ids, line in zip(prompts, lines)}

    def wrap(fn):
        def on_ids(ps: list[list[int]], rs: list[list[int]]):
            return fn([by_ids[tuple(p)] for p in ps], [decode_response(tok, r) for r in rs])

        return on_ids

    return wrap
