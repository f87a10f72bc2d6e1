"""What every online algorithm does before its advantages: sample answers (KV-cache generation with
ops.sample; the sampler's log-probs are the old log-probs) and score them (the reference's log-probs, a
reward model's or a function's reward). PPO, GRPO, RLOO and REINFORCE++ differ only after this."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from fastrlhf import ops
from fastrlhf.models import CausalLM, ScalarHeadModel, generate, last_token_index, left_pad_layout

RewardFn = Callable[[list[list[int]], list[list[int]]], "Sequence[float] | Tensor"]
"""reward_fn(prompts, responses) -> (B,) scores; token-id lists, responses cut after EOS (EOS included)."""


@dataclass(frozen=True)
class Samples:
    """B sampled episodes, everything (B, Tr) unless noted; Tp = the padded prompt length."""

    sequences: Tensor  # (B, Tp + Tr) left-padded prompt + response
    positions: Tensor  # (B, Tp + Tr)
    segment_ids: Tensor  # (B, Tp + Tr)
    Tp: int
    responses: Tensor
    mask: Tensor  # bool, response tokens up to and including EOS
    logprobs: Tensor  # the sampler's (old) log-probs
    hidden: Tensor | None  # (B, Tr, C) the sampling pass's final states, when asked for (a value head)

    def fields(self) -> dict[str, Any]:
        """The episodes' fields by name (to build a richer batch, e.g. PPO's Rollout, from them)."""
        return {f.name: getattr(self, f.name) for f in fields(Samples)}


def sample(
    policy: CausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    eos_token_id: int | None,
    generator: torch.Generator,
    return_hidden: bool = False,
) -> Samples:
    gen = generate(
        policy,
        prompts,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=eos_token_id,
        generator=generator,
        return_hidden=return_hidden,
    )
    positions, segment_ids = gen.layout()  # (B, Tp + Tr) each
    return Samples(
        gen.sequences,
        positions,
        segment_ids,
        gen.prompt_mask.shape[1],
        gen.responses,
        gen.response_mask,
        gen.logprobs,
        gen.hidden,
    )


def masked_responses(s: Samples) -> list[list[int]]:
    """Each episode's response ids up to and including EOS (what a reward function or scorer reads)."""
    return [[t for t, k in zip(r, mk) if k] for r, mk in zip(s.responses.tolist(), s.mask.tolist())]


def response_hidden(model: CausalLM, s: Samples, rows: Tensor | slice = slice(None)) -> Tensor:
    """(b, Tr, C): the trunk's hidden state at the positions that predict each response token. Only the
    last Tr + 1 positions are read, so the last block skips the prompt's rows (the trunk's tail)."""
    tail = s.sequences.shape[1] - s.Tp + 1  # positions Tp - 1 .. T - 1
    h = model.hidden(
        s.sequences[rows], positions=s.positions[rows], segment_ids=s.segment_ids[rows], tail=tail
    )
    return h[:, :-1]  # (b, Tr, C)


def group_response_hidden(model: CausalLM, s: Samples, rows: Tensor, group_size: int) -> Tensor:
    """(b, Tr, C): response_hidden(model, s, rows) for rows made of whole groups (each group_size consecutive
    rows answer one prompt), each group's prompt run once (models/shared.py): 1 / group_size of the prompt's
    arithmetic, the gradients of the group's answers summed back into its one prompt pass."""
    from fastrlhf.models.shared import SharedBatch

    first = rows[::group_size]  # (g,) each group's first row
    Tp = s.Tp
    b = SharedBatch(
        prefix=s.sequences[first, :Tp],  # (g, Tp) the prompts, left-padded
        prefix_pos=s.positions[first, :Tp],
        suffix=s.responses[rows],  # (b, Tr)
        suffix_pos=s.positions[rows, Tp:],
        group=torch.arange(len(first), device=rows.device).repeat_interleave(group_size),
        prefix_seg=s.segment_ids[first, :Tp],
        seg=s.segment_ids[rows],  # (b, Tp + Tr) over [the group's prompt | the response]
    )
    prompt, answer = model.shared_states(b)  # (g, Tp, C), (b, Tr, C)
    # the prompt's last token predicts the first response token, each response token the next
    return torch.cat([prompt[b.group, -1:], answer[:, :-1]], dim=1)  # (b, Tr, C)


def response_logprobs(model: CausalLM, s: Samples, temperature: float) -> Tensor:
    """(B, Tr) log-probs of each response token under `model` at `temperature` (e.g. the reference's)."""
    logits = model.lm_head(response_hidden(model, s))  # (B, Tr, V)
    return ops.token_logprobs(logits, s.responses, temperature=temperature)


def reward_model_scores(rm: ScalarHeadModel, s: Samples) -> Tensor:
    """(B,) fp32 the reward model's score at each response's last token, the trunk's last block run only
    from the earliest such token on (the trunk's tail)."""
    T = s.sequences.shape[1]
    index = s.Tp + last_token_index(s.mask)  # (B,) the last response token
    tail = T - int(index.min())
    h = rm.trunk.hidden(s.sequences, positions=s.positions, segment_ids=s.segment_ids, tail=tail)
    values = rm.head(h).squeeze(-1)  # (B, tail): positions T - tail .. T - 1
    return values.gather(1, (index - (T - tail))[:, None]).squeeze(1).float()


def function_scores(reward_fn: RewardFn, prompts: list[list[int]], s: Samples) -> Tensor:
    """(B,) fp32 a reward function's scores, checked for their count."""
    scores = torch.as_tensor(
        reward_fn(prompts, masked_responses(s)), dtype=torch.float32, device=s.mask.device
    )
    if scores.shape != (len(prompts),):
        raise ValueError(f"reward_fn must return {len(prompts)} scores; got shape {tuple(scores.shape)}")
    return scores


def take_samples(s: Samples, n: int) -> Samples:
    """The first n episodes of s."""
    return Samples(**{k: (v[:n] if isinstance(v, Tensor) else v) for k, v in s.fields().items()})


def merge_samples(parts: list[tuple[Samples, Tensor]]) -> Samples:
    """The kept rows (keep: (B,) bool) of several sampling rounds as one batch: prompts re-padded on the left
    and responses on the right to the longest of each (positions and segments follow, as generate lays them
    out). Hidden states are dropped."""
    rows = [(s, i) for s, keep in parts for i in keep.nonzero().squeeze(1).tolist()]
    Tp = max(s.Tp for s, _ in rows)
    Tr = max(s.responses.shape[1] for s, _ in rows)
    B = len(rows)
    seq = torch.zeros(B, Tp + Tr, dtype=torch.long)
    prompt_real = torch.zeros(B, Tp, dtype=torch.long)
    responses = torch.zeros(B, Tr, dtype=torch.long)
    mask = torch.zeros(B, Tr, dtype=torch.bool)
    logprobs = torch.zeros(B, Tr)
    for b, (s, i) in enumerate(rows):
        real = s.segment_ids[i, : s.Tp].bool()  # the prompt's real tokens
        p = s.sequences[i, : s.Tp][real]
        seq[b, Tp - len(p) : Tp] = p
        prompt_real[b, Tp - len(p) :] = 1
        r = s.responses.shape[1]
        responses[b, :r], mask[b, :r], logprobs[b, :r] = s.responses[i], s.mask[i], s.logprobs[i]
    seq[:, Tp:] = responses
    positions, segment_ids = left_pad_layout(
        torch.cat([prompt_real, torch.ones(B, Tr, dtype=torch.long)], dim=1)
    )  # (B, Tp + Tr) each
    return Samples(seq, positions, segment_ids, Tp, responses, mask, logprobs, None)
