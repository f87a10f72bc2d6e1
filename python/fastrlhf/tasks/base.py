"""What a task is: the interface the pipeline, the labelers and the trainers read from a task module.

A task module (tasks/<name>.py, found by tasks/registry.py) defines:
    NAME        the task's name (`--task NAME`)
    GOAL        a Goal: the true score's name, the gain over SFT the report calls met, the RM accuracy goal
    Options     a dataclass: the pipeline's [NAME] table (LABEL_FIELDS: those first read by the label stage)
    build(options, corpus) -> a Task object (below)
    score(prompt, response) -> float        the exact, true score (evaluation; reward = "task")
    preference(prompt, response) -> float   the scripted labeler's graded score (equal = tie)
and ships its pipeline defaults as tasks/<name>.toml beside the module."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Protocol

from fastrlhf.data.formats import SFTExample


@dataclass(frozen=True)
class Goal:
    metric: str
    """What `score` measures, as the report names it."""
    min_gain: float
    """The held-out gain of the aligned model over SFT that counts as met (and beyond two paired SEs)."""
    rm_accuracy: float
    """The reward model's held-out pairwise accuracy goal."""
    max_minutes: float = 20.0
    """The whole pipeline's stage time goal on 2 CPU cores with the task's defaults."""


def held_out_by_text(text: str, every: int) -> bool:
    """A split that depends on the text alone (not on order or a seed): held out when the CRC-32 of its UTF-8
    bytes is divisible by `every`."""
    return zlib.crc32(text.encode("utf-8")) % every == 0


class Task(Protocol):
    name: str

    def prompts(self, split: str) -> list[str]:
        """Prompts of the "train" or "heldout" split (the two never share a prompt)."""
        ...

    def demonstrations(self) -> list[SFTExample]:
        """SFT examples, made from train prompts only."""
        ...

    def pretrain_documents(self) -> list[str]:
        """The task's own pretraining corpus (when the run names none)."""
        ...
