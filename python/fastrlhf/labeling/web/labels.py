"""One labeler's file: an append-only JSONL log of what that person did, one event per line.

    {"sid": "9f2c...", "labeler": "ana", "prompt_id": "p-3f2a9c01d4e7", "prompt": "...", "responses": [...],
     "ranking": [2, 0, 3, 1], "flags": ["harmful"], "time": "2026-01-01T12:00:00+00:00"}      a ranking
    {..., "skip": "not sure what is asked", "flags": [], ...}                                    a skip
    {"sid": "41ab...", "labeler": "ana", "undo": "9f2c...", "time": "..."}                       an undo

`sid` is the submission id the page made (a retry carries the same one, so it is stored once); `undo` names
the sid of the labeler's last live event, which it cancels. The log is never rewritten, so a kill at any
moment leaves at worst a torn last line, which the server drops when it opens the file. Replaying the log
gives the labeler's live labels (rankings and skips) in order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastrlhf.data.formats import FormatError, PathLike, Ranking, ranking_problem

__all__ = ["Label", "LabelLog", "read_labels", "read_labels_dir"]


@dataclass(frozen=True)
class Label:
    """A live ranking (ranking set) or skip (skip set, possibly "") by one labeler."""

    sid: str
    labeler: str
    prompt_id: str
    prompt: str
    responses: tuple[str, ...]
    ranking: tuple[int, ...] | None = None
    skip: str | None = None
    flags: tuple[str, ...] = ()
    time: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "sid": self.sid,
            "labeler": self.labeler,
            "prompt_id": self.prompt_id,
            "prompt": self.prompt,
            "responses": list(self.responses),
        }
        if self.ranking is not None:
            out["ranking"] = list(self.ranking)
        else:
            out["skip"] = self.skip
        return {**out, "flags": list(self.flags), "time": self.time}

    def as_ranking(self) -> Ranking:
        assert self.ranking is not None, "a skip has no ranking"
        return Ranking(self.prompt, self.responses, self.ranking)


@dataclass
class LabelLog:
    """A replayed log: the live labels in order, every sid it holds (live, undone, undo events) and the
    byte length of a torn last line (0 when the file ends cleanly)."""

    labels: list[Label] = field(default_factory=list)
    sids: set[str] = field(default_factory=set)
    torn_tail: int = 0


def _label_from(path: PathLike, lineno: int, obj: dict[str, Any]) -> Label:
    def need(name: str, typ: type) -> Any:
        if not isinstance(obj.get(name), typ):
            raise FormatError(
                path, lineno, f"field {name!r} must be {typ.__name__}; got {obj.get(name)!r:.60}"
            )
        return obj[name]

    responses = tuple(need("responses", list))
    ranking = obj.get("ranking")
    if ranking is not None:
        problem = ranking_problem(responses, need("ranking", list))
        if problem:
            raise FormatError(path, lineno, problem)
    elif not isinstance(obj.get("skip"), str):
        raise FormatError(path, lineno, "an event needs 'ranking' (a list), 'skip' (a string) or 'undo'")
    flags = need("flags", list)
    if not all(isinstance(f, str) for f in flags):
        raise FormatError(path, lineno, f"'flags' must be strings; got {flags!r}")
    return Label(
        need("sid", str),
        need("labeler", str),
        need("prompt_id", str),
        need("prompt", str),
        responses,
        None if ranking is None else tuple(ranking),
        obj.get("skip") if ranking is None else None,
        tuple(flags),
        str(obj.get("time", "")),
    )


def parse_log(data: bytes, path: PathLike) -> LabelLog:
    """Replay a log's bytes. Everything after the last newline is a write cut off by a kill (every event
    is written as one line ending in a newline) and is only counted in torn_tail."""
    end = data.rfind(b"\n") + 1
    log = LabelLog(torn_tail=len(data) - end)
    for lineno, raw in enumerate(data[:end].split(b"\n")[:-1], start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(path, lineno, f"not a JSON line ({e})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("sid"), str):
            raise FormatError(path, lineno, "expected a JSON object with a string field 'sid'")
        if obj["sid"] in log.sids:
            raise FormatError(path, lineno, f"sid {obj['sid']!r} appears twice")
        log.sids.add(obj["sid"])
        if "undo" in obj:
            if not log.labels or log.labels[-1].sid != obj["undo"]:
                raise FormatError(path, lineno, f"undo of {obj['undo']!r}, which is not the last live event")
            log.labels.pop()
        else:
            log.labels.append(_label_from(path, lineno, obj))
    return log


def read_labels(path: PathLike) -> LabelLog:
    """Replay one labeler's file (read only: a torn last line is ignored, not removed)."""
    return parse_log(Path(path).read_bytes(), path)


def read_labels_dir(directory: PathLike) -> dict[str, list[Label]]:
    """{labeler: live labels} for every <labeler>.jsonl in a labels folder, by name."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"{d} is not a folder of per-labeler files (<name>.jsonl)")
    return {p.stem: read_labels(p).labels for p in sorted(d.glob("*.jsonl"))}
