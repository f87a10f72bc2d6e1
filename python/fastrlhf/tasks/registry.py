"""The tasks by name, found in this folder: every module that defines NAME (tasks/base.py says what else).
Adding a task is one module plus its defaults TOML beside it; no other file names a task. A task module
outside the package joins with `register_task(module)`."""

from __future__ import annotations

import importlib
import pkgutil
import tomllib
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

from fastrlhf.config import from_dict
from fastrlhf.tasks.base import Task

HERE = Path(__file__).parent


@cache
def _modules() -> dict[str, ModuleType]:
    found = {}
    for info in pkgutil.iter_modules([str(HERE)]):
        if info.name in ("base", "registry"):
            continue
        module = importlib.import_module(f"fastrlhf.tasks.{info.name}")
        if hasattr(module, "NAME"):
            found[module.NAME] = module
    return found


def register_task(module: ModuleType) -> None:
    """Make a task module importable by name (its NAME), e.g. one of your own outside fastrlhf/tasks."""
    missing = [
        a for a in ("NAME", "GOAL", "Options", "build", "score", "preference") if not hasattr(module, a)
    ]
    if missing:
        raise ValueError(f"task module {module.__name__} lacks {missing} (tasks/base.py says what each is)")
    _modules()[module.NAME] = module


def task_names() -> list[str]:
    return sorted(_modules())


def task_module(name: str) -> ModuleType:
    """The module of task `name`; ValueError listing the valid names."""
    if name not in _modules():
        raise ValueError(f"unknown task {name!r}; valid names: {', '.join(task_names())}")
    return _modules()[name]


def task_options(name: str, data: dict[str, Any] | None = None) -> Any:
    """The task's Options from plain data (its [name] table); errors name the field as [name] field."""
    return from_dict(task_module(name).Options, data or {}, f"{name}.")


def load_task(name: str, options: Any = None, corpus: str = "") -> Task:
    """Task `name` built from its Options (default: its defaults) and the corpus path the run names."""
    module = task_module(name)
    return module.build(options if options is not None else module.Options(), corpus)


def task_defaults(name: str) -> dict[str, Any]:
    """The task's pipeline defaults: tasks/<name>.toml as plain data (sections of the pipeline config)."""
    path = Path(task_module(name).__file__).with_suffix(".toml")
    return tomllib.loads(path.read_text()) if path.is_file() else {}
