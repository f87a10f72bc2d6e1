"""The built-in tasks by name: `get_task("arithmetic")`, `get_task("sentiment", lines=corpus_lines)`."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Protocol

from fastrlhf.data.formats import SFTExample
from fastrlhf.tasks.arithmetic import ArithmeticTask
from fastrlhf.tasks.sentiment import make_sentiment_task

__all__ = ["TASKS", "Task", "get_task"]


class Task(Protocol):
    """What the trainers and the labeling loop need from a task."""

    name: str
    labeler: str  # name of its scripted labeler in train.labelers.make_labeler

    def prompts(self, split: str) -> list[str]:
        """Prompts of the "train" or "heldout" split (the two never share a prompt)."""
        ...

    def demonstrations(self) -> list[SFTExample]:
        """SFT examples, made from train prompts only."""
        ...


TASKS: dict[str, Callable[..., Task]] = {"arithmetic": ArithmeticTask, "sentiment": make_sentiment_task}


def get_task(name: str, **kwargs: Any) -> Task:
    """The task registered under name, built with kwargs (sentiment needs lines=<corpus lines>)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid names: {', '.join(sorted(TASKS))}")
    factory = TASKS[name]
    signature = inspect.signature(factory)
    try:
        signature.bind(**kwargs)
    except TypeError as e:
        raise TypeError(f"task {name!r} takes {signature}; {e}") from None
    return factory(**kwargs)
