"""The pipeline's evaluation: the SFT policy and each RL policy (and the pretrained model a run starts from)
answer the same held-out prompts, and every answer is scored four ways: the task's true score, the reward
model's (when the run has one), its KL to the SFT model, and its log-likelihood under the frozen base model
(the pretrained model, or the pretrain stage's), whose per-token mean gives each model's perplexity: answers
that drift into lists of rewarded words read as unlikely English there."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from fastrlhf import ops
from fastrlhf.data import decode_response, encode_prompt
from fastrlhf.models import GPT, Generation, ScalarHeadModel, generate
from fastrlhf.models.heads import last_token_index
from fastrlhf.tasks.registry import task_module


def sequence_logprobs(model: GPT, gen: Generation, temperature: float) -> Tensor:
    """(B,) log-prob of each sampled response under `model` at `temperature`, summed over its tokens."""
    positions, segment_ids = gen.layout()  # (B, Tp + Tr) each
    Tp = gen.prompt_mask.shape[1]
    h = model.hidden(gen.sequences, positions=positions, segment_ids=segment_ids)[
        :, Tp - 1 : -1
    ]  # (B, Tr, C)
    logprobs = ops.token_logprobs(model.lm_head(h), gen.responses, temperature=temperature)  # (B, Tr)
    return (logprobs * gen.response_mask).sum(dim=1)


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct-n (Li et al., NAACL 2016): distinct word n-grams over all n-grams of all texts (lowercased,
    split on whitespace); 0 when the texts hold no n-gram."""
    grams = [tuple(w[i : i + n]) for t in texts for w in [t.lower().split()] for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def base_model_path(run: Any) -> Any:
    """The frozen base model of a run: the pretrained model it starts from, else its pretrain stage (None
    when neither exists, e.g. an SFT stage started from elsewhere)."""
    if run.cfg.run.model:
        return run.cfg.run.model
    return run.dir("pretrain") if run.done("pretrain") is not None else None


def rm_scores(rm: ScalarHeadModel, gen: Generation) -> Tensor:
    """(B,) the reward model's score at each response's last token, read exactly as PPO reads it."""
    positions, segment_ids = gen.layout()
    index = gen.prompt_mask.shape[1] + last_token_index(gen.response_mask)  # (B,)
    return rm.score(gen.sequences, index, positions=positions, segment_ids=segment_ids).float()


@torch.no_grad()
def answer_and_score(
    run: Any, prompts: list[str], progress: bool = True, policies: dict[str, GPT] | None = None
) -> list[dict[str, Any]]:
    """One row per prompt: {"prompt", "sft": {...}, "<algo>": {...} ...} with each model's response, true
    score, reward-model score (NaN without an rm stage), KL to the SFT model (sum over tokens of log pi -
    log pi_sft) and length. `policies`: name -> policy compared with SFT (default: the run's checkpoint of
    each algorithm in run.algos)."""
    from tqdm import tqdm

    from fastrlhf.models.load import load_model
    from fastrlhf.train.reward import load_reward_model

    cfg = run.cfg
    sft, tok = load_model(run.dir("sft"))
    path = base_model_path(run)
    base = load_model(path)[0] if path is not None else None
    if policies is None:
        policies = {a: load_model(run.dir(a))[0] for a in run.algos}
    # the pretrained model a run starts from answers first, then SFT, then the RL models
    first = {"base": base} if cfg.run.model and base is not None and "base" not in policies else {}
    policies = {**first, "sft": sft, **policies}
    rm = load_reward_model(run.dir("rm"))[0] if run.done("rm") is not None else None
    score = task_module(cfg.run.task).score
    p = cfg.ppo.ppo
    rows: list[dict[str, Any]] = [{"prompt": x} for x in prompts]
    for i in tqdm(range(0, len(prompts), cfg.eval.batch), desc="eval", disable=not progress, unit="batch"):
        chunk = prompts[i : i + cfg.eval.batch]
        ids = [encode_prompt(tok, x) for x in chunk]
        for who, model in policies.items():
            # the same seed for both models: differences come from the weights, not the draw
            g = torch.Generator().manual_seed(cfg.eval.seed + i)
            gen = generate(
                model, ids, p.max_new_tokens, temperature=p.temperature, eos_token_id=tok.eot_id, generator=g
            )
            ref = sequence_logprobs(sft, gen, p.temperature)  # (B,)
            kl = (
                torch.zeros_like(ref) if model is sft else sequence_logprobs(model, gen, p.temperature) - ref
            )  # (B,)
            reward = rm_scores(rm, gen) if rm is not None else torch.full((len(ids),), math.nan)  # (B,)
            nll = -sequence_logprobs(base, gen, 1.0) if base is not None else torch.full_like(ref, math.nan)
            lengths = gen.response_mask.sum(dim=1)
            for j, (resp, mask) in enumerate(zip(gen.responses.tolist(), gen.response_mask.tolist())):
                text = decode_response(tok, [t for t, m in zip(resp, mask) if m])
                rows[i + j][who] = {
                    "response": text,
                    "score": score(chunk[j], text),
                    "reward": float(reward[j]),
                    "kl": float(kl[j]),
                    "length": int(lengths[j]),
                    "base_nll": float(nll[j]),
                }
    return rows
