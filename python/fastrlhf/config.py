"""Typed run configs, one mechanism for every command, the pipeline and the tasks' defaults: a dataclass
of sections, filled from a TOML file and then from command-line overrides `section.field=value` (e.g.
`train.max_steps=200 optim.lr=1e-3`). Unknown sections or fields and values of the wrong type are errors
that name them; `check_range` / `check_choice` are the validators every config's __post_init__ uses."""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def check_range(
    where: str, value: float, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
) -> None:
    """The config validators every section uses: value in [lo, hi] (open ends as asked) and finite, or a
    ValueError that names the field (`where`), the range and the value."""
    ok = math.isfinite(value) if isinstance(value, float) else True
    ok = ok and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{where} must be in {rng}; got {value!r}")


def check_choice(where: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{where} must be one of {list(choices)}; got {value!r}")


INF = float("inf")


def _convert(value: Any, typ: Any, where: str) -> Any:
    """value (from TOML, or a string from the command line) as typ; ValueError naming `where`."""
    if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union:
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _convert(value, args[0], where)
    if typing.get_origin(typ) is list:  # a TOML array, or "a,b,c" on the command line
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise ValueError(f"{where} must be a list; got {value!r} ({type(value).__name__})")
        (item,) = typing.get_args(typ)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(items)]
    if isinstance(value, str) and typ is not str:
        text = value.strip().lower()
        if typ is bool:
            if text not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"{where} must be true or false; got {value!r}")
            return text in ("true", "1", "yes")
        try:
            return typ(value.replace("_", "")) if typ in (int, float) else typ(value)
        except ValueError:
            raise ValueError(f"{where} must be {typ.__name__}; got {value!r}") from None
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ValueError(f"{where} must be {typ.__name__}; got {value!r} ({type(value).__name__})")
    return value


def _fill(cls: type[T], data: dict[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown {'field' if where else 'section'}(s) {[f'{where}{u}' for u in unknown]}; "
            f"known: {sorted(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ValueError(f"[{where}{name}] must be a table; got {value!r}")
            kwargs[name] = _fill(typ, value, f"{where}{name}.")
        else:
            kwargs[name] = _convert(value, typ, f"{where}{name}")
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """['train.lr=3e-4', '--model.n_layer=2'] -> {'train': {'lr': '3e-4'}, 'model': {'n_layer': '2'}}."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.removeprefix("--").partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like section.field=value")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """cls's defaults, updated by the TOML file at path, updated by the overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path} is not valid TOML: {exc}") from exc
    return _fill(cls, merge(data, parse_overrides(overrides or [])), "")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """cls filled from plain data (a section's table when `where` is "section.", which errors then name)."""
    return _fill(cls, data, where)
