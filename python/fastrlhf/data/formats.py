"""Data formats for SFT demonstrations and rankings, and a crash-safe appending writer.

One record per JSONL line (UTF-8) or Parquet row (data/rows.py):
  SFT       {"prompt": P, "response": str}
            {"messages": [{"role", "content"}, ...]}   each assistant turn is an example (its prompt: the
                                                       turns before it), as HF datasets and OpenAI write them
  ranking   {"prompt": P, "responses": [str, ...], "ranking": [int, ...]}   best first, a permutation of
            range(K), K >= 2; optionally "scores": [float, ...], a scripted labeler's score of each
            response (equal scores are ties, whose pairs state no preference)
  pair      {"prompt": P, "chosen": str, "rejected": str}                  read as a ranking with K = 2
P is a string or a list of messages (a conversation; data/messages.py). Blank lines are skipped. Every
error names `file:line` (or the Parquet row) and what is wrong.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import combinations, pairwise
from pathlib import Path
from typing import Any, Self

from fastrlhf.data.messages import Prompt, parse_messages, prompt_json, prompt_problem
from fastrlhf.data.rows import FormatError, PathLike, iter_objects

__all__ = [
    "FormatError",
    "JsonlAppender",
    "Ranking",
    "RankingLog",
    "SFTExample",
    "iter_rankings",
    "iter_sft",
    "numbered_rankings",
    "ranking_problem",
    "read_rankings",
    "read_sft",
    "scores_problem",
    "write_rankings",
    "write_sft",
]


def _empty(text: str) -> bool:
    return not text.strip()


def ranking_problem(responses: Sequence[Any], ranking: Sequence[Any]) -> str | None:
    """What is wrong with (responses, ranking) as a ranking, or None when it is valid."""
    k = len(responses)
    if k < 2:
        return f"a ranking needs K >= 2 responses; got K = {k}"
    for i, r in enumerate(responses):
        if not isinstance(r, str):
            return f"responses[{i}] must be a string; got {type(r).__name__}"
        if _empty(r):
            return f"responses[{i}] is empty"
    # bool is an int subclass; true/false in a ranking is a typo, not an index
    if any(isinstance(i, bool) or not isinstance(i, int) for i in ranking):
        return f"ranking must be a list of integers; got {list(ranking)!r}"
    if sorted(ranking) != list(range(k)):
        return f"ranking must be a permutation of range({k}) (indices into responses, best first); got {list(ranking)}"
    return None


def scores_problem(scores: Sequence[Any], ranking: Sequence[int]) -> str | None:
    """What is wrong with a ranking's optional scores (one finite number per response, never higher
    further down the ranking), or None."""
    if len(scores) != len(ranking) or any(
        isinstance(x, bool) or not isinstance(x, (int, float)) for x in scores
    ):
        return f"scores must be {len(ranking)} numbers, one per response; got {list(scores)!r}"
    if not all(math.isfinite(x) for x in scores):
        return f"scores must be finite; got {list(scores)!r}"
    ordered = [scores[i] for i in ranking]
    if any(a < b for a, b in pairwise(ordered)):
        return f"scores {list(scores)!r} contradict the ranking {list(ranking)!r} (a better response scores lower)"
    return None


@dataclass(frozen=True)
class SFTExample:
    """One demonstration: the loss counts the response tokens only."""

    prompt: Prompt
    response: str

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, (str, tuple)) or not isinstance(self.response, str):
            raise TypeError("prompt must be a string or a tuple of Turns, and response a string")
        if problem := prompt_problem(self.prompt):
            raise ValueError(problem)
        if _empty(self.response):
            raise ValueError("response is empty")


@dataclass(frozen=True)
class Ranking:
    """K responses to one prompt and their order: ranking[0] indexes the best response. `scores`, when a
    scripted labeler gives them, mark ties: responses with equal scores are not preferred either way."""

    prompt: Prompt
    responses: tuple[str, ...]
    ranking: tuple[int, ...]
    scores: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        # accept lists from callers, store tuples so a Ranking is hashable and immutable
        object.__setattr__(self, "responses", tuple(self.responses))
        object.__setattr__(self, "ranking", tuple(self.ranking))
        if not isinstance(self.prompt, (str, tuple)):
            raise TypeError(f"prompt must be a string or a tuple of Turns; got {type(self.prompt).__name__}")
        problem = prompt_problem(self.prompt) or ranking_problem(self.responses, self.ranking)
        if problem is None and self.scores is not None:
            object.__setattr__(self, "scores", tuple(self.scores))
            problem = scores_problem(self.scores, self.ranking)
        if problem:
            raise ValueError(problem)

    @property
    def k(self) -> int:
        return len(self.responses)

    def pairs(self) -> list[tuple[int, int]]:
        """All C(K, 2) (better, worse) index pairs this ranking implies (InstructGPT section 3.5), less
        the tied ones when scores are given."""
        pairs = combinations(self.ranking, 2)
        return [(b, w) for b, w in pairs if self.scores is None or self.scores[b] > self.scores[w]]

    def to_json(self) -> dict[str, Any]:
        out = {
            "prompt": prompt_json(self.prompt),
            "responses": list(self.responses),
            "ranking": list(self.ranking),
        }
        return out if self.scores is None else {**out, "scores": list(self.scores)}


# --- reading -------------------------------------------------------------------------------------------


def _check_fields(
    path: PathLike, lineno: int, obj: dict[str, Any], fields: dict[str, type], what: str
) -> None:
    missing = [k for k in fields if k not in obj]
    extra = sorted(k for k in obj if k not in fields)
    expected = ", ".join(fields)
    if missing:
        raise FormatError(path, lineno, f"{what} is missing field {missing[0]!r} (expected {expected})")
    if extra:
        raise FormatError(path, lineno, f"unexpected field {extra[0]!r} in {what} (expected {expected})")
    for name, typ in fields.items():
        if typ is not Prompt and not isinstance(obj[name], typ):
            raise FormatError(
                path, lineno, f"field {name!r} must be {typ.__name__}; got {type(obj[name]).__name__}"
            )


def _prompt_from(path: PathLike, lineno: int, value: Any) -> Prompt:
    """A record's "prompt": a string, or a list of messages (a conversation)."""
    if isinstance(value, str):
        return value
    turns, problem = parse_messages(value, "prompt")
    if problem or (problem := prompt_problem(turns)):
        raise FormatError(path, lineno, f"{problem} (prompt: a string or a list of messages)")
    return turns


def _sft_from(path: PathLike, lineno: int, obj: dict[str, Any]) -> list[SFTExample]:
    if "messages" in obj:
        _check_fields(path, lineno, obj, {"messages": list}, "an SFT conversation")
        turns, problem = parse_messages(obj["messages"])
        answers = [
            i for i, t in enumerate(turns) if t.role == "assistant" and prompt_problem(turns[:i]) is None
        ]
        if problem or not answers or any(_empty(turns[i].content) for i in answers):
            why = problem or "needs an assistant turn after a user turn, with text"
            raise FormatError(path, lineno, f"messages: {why}")
        return [SFTExample(turns[:i], turns[i].content) for i in answers]
    _check_fields(path, lineno, obj, {"prompt": Prompt, "response": str}, "an SFT example")
    if _empty(obj["response"]):
        raise FormatError(path, lineno, "response is empty")
    return [SFTExample(_prompt_from(path, lineno, obj["prompt"]), obj["response"])]


def iter_sft(path: PathLike) -> Iterator[SFTExample]:
    """SFT examples from a JSONL or Parquet file, checked record by record."""
    for lineno, _, obj in iter_objects(path):
        yield from _sft_from(path, lineno, obj)


def _ranking_from(path: PathLike, lineno: int, obj: dict[str, Any]) -> Ranking:
    if "chosen" in obj or "rejected" in obj:
        _check_fields(path, lineno, obj, {"prompt": Prompt, "chosen": str, "rejected": str}, "a pair")
        responses, ranking = [obj["chosen"], obj["rejected"]], [0, 1]
        for name in ("chosen", "rejected"):
            if _empty(obj[name]):
                raise FormatError(path, lineno, f"{name} is empty")
    else:
        fields = {
            "prompt": Prompt,
            "responses": list,
            "ranking": list,
            **({"scores": list} if "scores" in obj else {}),
        }
        _check_fields(path, lineno, obj, fields, "a ranking")
        responses, ranking = obj["responses"], obj["ranking"]
    problem = ranking_problem(responses, ranking)
    if problem is None and "scores" in obj:
        problem = scores_problem(obj["scores"], ranking)
    if problem:
        raise FormatError(path, lineno, problem)
    return Ranking(
        _prompt_from(path, lineno, obj["prompt"]), tuple(responses), tuple(ranking), obj.get("scores")
    )


def numbered_rankings(path: PathLike) -> Iterator[tuple[int, Ranking]]:
    """(line number, ranking) pairs; pair lines ({"prompt", "chosen", "rejected"}) become K = 2 rankings."""
    for lineno, _, obj in iter_objects(path):
        yield lineno, _ranking_from(path, lineno, obj)


def iter_rankings(path: PathLike) -> Iterator[Ranking]:
    """Rankings from a JSONL file; pair lines ({"prompt", "chosen", "rejected"}) become K = 2 rankings."""
    for _, r in numbered_rankings(path):
        yield r


def read_sft(path: PathLike) -> list[SFTExample]:
    return list(iter_sft(path))


def read_rankings(path: PathLike) -> list[Ranking]:
    return list(iter_rankings(path))


# --- writing -------------------------------------------------------------------------------------------


def _line(obj: dict[str, Any]) -> bytes:
    # ensure_ascii=False keeps non-English text readable; json escapes "\n", so one record = one line
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")


def _write_all(path: PathLike, objs: Iterable[dict[str, Any]]) -> None:
    tmp = Path(f"{os.fspath(path)}.tmp")
    with open(tmp, "wb") as f:
        f.writelines(_line(obj) for obj in objs)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # all or nothing: a reader never sees half a file


def write_sft(path: PathLike, examples: Iterable[SFTExample]) -> None:
    _write_all(path, ({"prompt": prompt_json(e.prompt), "response": e.response} for e in examples))


def write_rankings(path: PathLike, rankings: Iterable[Ranking]) -> None:
    _write_all(path, (r.to_json() for r in rankings))


class JsonlAppender:
    """Appends one JSON object per line and fsyncs each, so a record that append() returned survives a
    crash or a kill. truncate(offset) removes everything from a record's offset on (undo)."""

    def __init__(self, path: PathLike) -> None:
        self.path = os.fspath(path)
        existed = os.path.exists(self.path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not existed:  # make the new directory entry itself durable
            dfd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def append(self, obj: dict[str, Any]) -> int:
        """Write obj as one line, fsync, and return the byte offset the line starts at."""
        end = self.size()
        # a hand-written file whose last line lacks its newline: end that line first
        lead = b"\n" if end and os.pread(self._fd, 1, end - 1) != b"\n" else b""
        os.pwrite(self._fd, lead + _line(obj), end)  # one write: a crash leaves a prefix, never a mix
        os.fsync(self._fd)
        return end + len(lead)

    def truncate(self, offset: int) -> None:
        os.ftruncate(self._fd, offset)
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RankingLog:
    """A rankings file opened for appending: loads (and checks) what is there, appends with fsync, and
    pops the last record for undo. A last line that has no newline and is not complete JSON is a write
    cut off by a crash before it was confirmed: it is dropped and its size kept in `dropped_tail_bytes`."""

    def __init__(self, path: PathLike) -> None:
        self.path = os.fspath(path)
        self._out = JsonlAppender(self.path)
        self.dropped_tail_bytes = self._drop_torn_tail()
        self.records: list[Ranking] = []
        self._offsets: list[int] = []
        for lineno, offset, obj in iter_objects(self.path):
            self.records.append(_ranking_from(self.path, lineno, obj))
            self._offsets.append(offset)

    def _drop_torn_tail(self) -> int:
        data = Path(self.path).read_bytes()
        tail = data[data.rfind(b"\n") + 1 :]
        if not tail.strip():
            return 0
        try:
            json.loads(tail)
            return 0  # complete, only its newline is missing: kept, and append() adds the newline
        except ValueError:
            self._out.truncate(len(data) - len(tail))
            return len(tail)

    def append(self, r: Ranking) -> None:
        self._offsets.append(self._out.append(r.to_json()))
        self.records.append(r)

    def pop(self) -> Ranking:
        """Remove the last record from the file (durably) and return it."""
        if not self.records:
            raise IndexError("the rankings file has no record to undo")
        self._out.truncate(self._offsets.pop())
        return self.records.pop()

    def close(self) -> None:
        self._out.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
