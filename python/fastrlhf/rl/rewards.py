"""Reward sources of the critic-free trainers, each a reward_fn(prompts, responses) -> (B,) scores on
token ids: a task's exact scorer, a reward model's score, a Python function on text, or several weighted
together ('task + 0.5 * runs/arith/rm'). Every source's scores are checked for their count (an error) and
for NaN / inf (NonFiniteReward: the trainer skips the step and counts it, as PPO does)."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fastrlhf.models import ScalarHeadModel, left_pad_layout
from fastrlhf.rl.rollout import RewardFn

_TERM = re.compile(r"^\s*(?:(?P<w>[-+]?[0-9.]+(?:[eE][-+]?[0-9]+)?)\s*\*\s*)?(?P<src>[^\s*][^*]*?)\s*$")
_FUNCTION = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class NonFiniteReward(ValueError):
    """A reward source returned NaN or inf: the step is skipped and counted, not the run aborted."""


def check_scores(name: str, scores: Sequence[float] | Tensor, n: int) -> Tensor:
    """scores as a (n,) fp32 tensor; ValueError naming `name` for a wrong count, NonFiniteReward for NaN/inf."""
    t = torch.as_tensor(scores, dtype=torch.float32).cpu()
    if t.shape != (n,):
        raise ValueError(f"{name} must return {n} scores; got shape {tuple(t.shape)}")
    bad = (~torch.isfinite(t)).nonzero().squeeze(1).tolist()
    if bad:
        raise NonFiniteReward(
            f"{name} returned non-finite rewards for {len(bad)} of {n} answers (rows {bad[:8]}"
            f"{', ...' if len(bad) > 8 else ''})"
        )
    return t


def parse_reward(spec: str) -> list[tuple[float, str]]:
    """'task + 0.5 * runs/rm + 0.1 * pkg.mod:fn' -> [(1.0, 'task'), (0.5, 'runs/rm'), (0.1, 'pkg.mod:fn')]."""
    terms = []
    for part in spec.split(" + "):
        m = _TERM.match(part)
        if m is None:
            raise ValueError(
                f"train.reward must be sources joined by ' + ', each 'SOURCE' or 'WEIGHT * SOURCE'; got {spec!r}"
            )
        terms.append((float(m["w"]) if m["w"] else 1.0, m["src"]))
    return terms


def is_function(source: str) -> bool:
    """'package.module:function' names a Python reward function (anything else a task or an RM folder)."""
    return bool(_FUNCTION.match(source))


def import_function(source: str) -> Callable[[list[str], list[str]], Sequence[float]]:
    """The function 'package.module:function' names; errors name what is missing."""
    module, _, name = source.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"reward source {source!r}: cannot import module {module!r} ({exc})") from None
    except AttributeError:
        raise ValueError(f"reward source {source!r}: module {module!r} has no {name!r}") from None
    if not callable(fn):
        raise ValueError(f"reward source {source!r} is not callable; got {type(fn).__name__}")  # noqa: TRY004
    return fn


class WeightedReward:
    """sum_i weight_i * source_i(prompts, responses), each source's scores checked under its own name."""

    def __init__(self, sources: list[tuple[str, float, RewardFn]]):
        if not sources:
            raise ValueError("a reward needs at least one source; got none")
        self.sources = sources

    def __call__(self, prompts: list[list[int]], responses: list[list[int]]) -> Tensor:
        total = torch.zeros(len(prompts))
        for name, weight, fn in self.sources:
            total += weight * check_scores(f"reward source {name!r}", fn(prompts, responses), len(prompts))
        return total


def rm_reward_fn(rm: ScalarHeadModel, pad_id: int) -> RewardFn:
    """reward_fn(prompts, responses) of a reward model: its score at each answer's last token."""

    @torch.no_grad()
    def reward_fn(ps: list[list[int]], rs: list[list[int]]) -> Tensor:
        seqs = [p + r for p, r in zip(ps, rs)]
        T = max(map(len, seqs))
        idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # (B, T) left-padded
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
