"""Labelers rank K responses to one prompt, best first: the human-feedback plug-in of the recipe.

All share one interface, `rank(prompt, responses) -> ranking` (indices into responses, best first).
`label_prompts` runs any labeler over (prompt, responses) items and appends each ranking to a JSONL file
the moment it is made, with resume, undo and quit (the terminal labeler's keys; scripted labelers never
use them). Scripted labelers break ties by response index, so their rankings are deterministic.
"""

from __future__ import annotations

import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TextIO

from fastrlhf.data.formats import (
    FormatError,
    PathLike,
    Ranking,
    RankingLog,
    numbered_rankings,
    ranking_problem,
)
from fastrlhf.tasks.registry import task_module, task_names

__all__ = [
    "LABELERS",
    "JsonlLabeler",
    "LabelStats",
    "Labeler",
    "Quit",
    "ScoreLabeler",
    "TerminalLabeler",
    "Undo",
    "label_prompts",
    "make_labeler",
    "parse_typed_ranking",
]


class Undo(Exception):
    """The person asked to take back the previous prompt's ranking (handled by label_prompts)."""


class Quit(Exception):
    """The person asked to stop (handled by label_prompts: everything ranked so far is already saved)."""


def _short(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[: n - 3] + "...")


def _order(keys: Sequence[object]) -> list[int]:
    """Indices sorted by key, ties by index (a stable, deterministic order)."""
    return sorted(range(len(keys)), key=lambda i: (keys[i], i))


class Labeler(ABC):
    """rank() checks the responses at the boundary (K >= 2, non-empty strings) and checks that the
    implementation's answer is a permutation of range(K); subclasses write _rank()."""

    name: str = ""

    def rank(self, prompt: str, responses: Sequence[str]) -> list[int]:
        responses = list(responses)
        problem = ranking_problem(responses, range(len(responses)))
        if problem:
            raise ValueError(f"cannot rank the responses to {_short(prompt)}: {problem}")
        ranking = list(self._rank(prompt, responses))
        problem = ranking_problem(responses, ranking)
        if problem:
            raise RuntimeError(f"{type(self).__name__} returned an invalid ranking: {problem}")
        return ranking

    @abstractmethod
    def _rank(self, prompt: str, responses: list[str]) -> list[int]: ...

    def scores(self, prompt: str, responses: Sequence[str]) -> list[float] | None:
        """A scripted labeler's score of each response (higher is better; equal scores are ties), stored
        with the ranking so that tied pairs train nothing; None for labelers without scores (people)."""
        return None

    def notice(self, text: str) -> None:
        """A message for the person labeling (resume, nothing to undo); scripted labelers ignore it."""


class ScoreLabeler(Labeler):
    """A scripted labeler: ranks by a task's graded score (`preference(prompt, response)`, higher is better,
    equal scores tie), e.g. VADER's compound for sentiment, distance to the right sum for arithmetic."""

    def __init__(self, name: str, preference: Callable[[str, str], float]) -> None:
        self.name, self._preference = name, preference

    def scores(self, prompt: str, responses: Sequence[str]) -> list[float]:
        return [self._preference(prompt, r) for r in responses]

    def _rank(self, prompt: str, responses: list[str]) -> list[int]:
        return _order([-x for x in self.scores(prompt, responses)])


class JsonlLabeler(Labeler):
    """Rankings read from a rankings file, looked up by prompt and the set of responses (in any order)."""

    name = "jsonl"

    def __init__(self, path: PathLike) -> None:
        self.path = os.fspath(path)
        # (prompt, responses sorted) -> (responses best first, line); texts, not indices, so the lookup
        # works whatever order the responses come in, and equal responses are interchangeable
        self._table: dict[tuple[str, tuple[str, ...]], tuple[tuple[str, ...], int]] = {}
        for line, r in numbered_rankings(self.path):
            key = (r.prompt, tuple(sorted(r.responses)))
            best_first = tuple(r.responses[i] for i in r.ranking)
            seen = self._table.setdefault(key, (best_first, line))
            if seen[0] != best_first:
                raise FormatError(
                    self.path, line, f"ranks the same prompt and responses as line {seen[1]} differently"
                )

    def _rank(self, prompt: str, responses: list[str]) -> list[int]:
        found = self._table.get((prompt, tuple(sorted(responses))))
        if found is None:
            raise LookupError(
                f"{self.path} has no ranking of these {len(responses)} responses to {_short(prompt)}"
            )
        free = list(range(len(responses)))
        ranking = []
        for text in found[0]:
            i = next(j for j in free if responses[j] == text)
            free.remove(i)
            ranking.append(i)
        return ranking


def parse_typed_ranking(text: str, k: int) -> list[int]:
    """A typed ranking, 1-based and best first ("2 1 4 3", "2,1,4,3", or "2143" when K <= 9), as 0-based
    indices; ValueError saying what is wrong otherwise."""
    s = text.strip().replace(",", " ")
    parts = s.split() if (" " in s or k > 9) else list(s)
    example = " ".join(str(i) for i in [2, 1, *range(3, k + 1)])
    try:
        ranking = [int(p) - 1 for p in parts]
    except ValueError:
        raise ValueError(
            f"type the answer numbers best first, e.g. '{example}'; got {text.strip()!r}"
        ) from None
    if sorted(ranking) != list(range(k)):
        raise ValueError(
            f"give each of the numbers 1..{k} once, best first, e.g. '{example}'; got {text.strip()!r}"
        )
    return ranking


def _printable(text: str) -> str:
    # model output may hold escape sequences: show them, never let them drive the terminal
    return "".join(c if c in "\n\t" or c.isprintable() else repr(c)[1:-1] for c in text)


class TerminalLabeler(Labeler):
    """A person ranks K answers per prompt: one prompt per screen, answers numbered from 1, the ranking
    typed as a line. `u` raises Undo, `q`, end of input (Ctrl-D) or Ctrl-C raise Quit."""

    name = "terminal"

    def __init__(
        self, input: TextIO | None = None, output: TextIO | None = None, clear: bool | None = None
    ) -> None:
        self.input = input if input is not None else sys.stdin
        self.output = output if output is not None else sys.stdout
        self.clear = self.output.isatty() if clear is None else clear  # clear the screen only on a terminal
        self._notices: list[str] = []

    def notice(self, text: str) -> None:
        self._notices.append(text)  # shown on the next screen

    def _show(self, prompt: str, responses: list[str], error: str | None) -> None:
        w = self.output.write
        if self.clear:
            w("\x1b[2J\x1b[H")
        for n in self._notices:
            w(f"* {n}\n")
        self._notices.clear()
        w(f"=== prompt ===\n{_printable(prompt)}\n=== {len(responses)} answers ===\n")
        for i, r in enumerate(responses, start=1):
            w(f"[{i}] " + _printable(r).replace("\n", "\n    ") + "\n")
        order = [str(i) for i in [2, 1, *range(3, len(responses) + 1)]]
        example = f"'{' '.join(order)}'" + (f" or '{''.join(order)}'" if len(order) <= 9 else "")
        w(f"Type the answer numbers best first, e.g. {example}, then Enter.\n")
        w("u = undo the previous prompt, q = save and quit\n")
        if error:
            w(f"! {error}\n")
        w("> ")
        self.output.flush()

    def _rank(self, prompt: str, responses: list[str]) -> list[int]:
        try:
            return self._ask(prompt, responses)
        except KeyboardInterrupt:  # Ctrl-C anywhere on the screen, not only while reading
            raise Quit from None

    def _ask(self, prompt: str, responses: list[str]) -> list[int]:
        error = None
        while True:
            self._show(prompt, responses, error)
            line = self.input.readline()
            command = line.strip().lower()
            if not line or command in ("q", "quit"):  # "" is end of input (Ctrl-D)
                raise Quit
            if command in ("u", "undo"):
                raise Undo
            try:
                return parse_typed_ranking(line, len(responses))
            except ValueError as e:
                error = str(e)


@dataclass
class LabelStats:
    labeled: int = 0
    """rankings appended in this call (an undone-and-redone prompt counts twice)"""
    undone: int = 0
    """rankings removed by undo"""
    skipped: int = 0
    """items whose prompt was already in the file (resume)"""
    quit: bool = False
    """the labeler stopped before the items ran out"""
    total: int = 0
    """rankings in the file at the end"""


Responses = Sequence[str] | Callable[[], Sequence[str]]


def label_prompts(labeler: Labeler, items: Iterable[tuple[str, Responses]], out_path: PathLike) -> LabelStats:
    """Rank each (prompt, responses) item and append the ranking to out_path (JSONL rankings) at once,
    fsynced, so an interrupt loses nothing already ranked. An item whose prompt is already in the file
    is skipped (resume); responses may be a callable, called only for prompts not skipped (so a sampler
    does no work for them). Undo removes the file's last ranking and shows that prompt again."""
    stats = LabelStats()
    with RankingLog(out_path) as log:
        done = {r.prompt for r in log.records}
        if log.dropped_tail_bytes:
            labeler.notice(
                f"dropped an incomplete last line ({log.dropped_tail_bytes} bytes) from {log.path}"
            )
        if log.records:
            labeler.notice(f"resuming: {len(log.records)} prompts already ranked in {log.path}")
        redo: list[tuple[str, Sequence[str]]] = []  # prompts to show (again) before the next item; last first
        it = iter(items)
        while True:
            if redo:
                prompt, responses = redo.pop()
            else:
                try:
                    prompt, given = next(it)
                except StopIteration:
                    break
                if prompt in done:
                    stats.skipped += 1
                    continue
                responses = given() if callable(given) else given
            try:
                ranking = labeler.rank(prompt, responses)
            except Undo:
                redo.append((prompt, responses))
                if log.records:
                    last = log.pop()
                    done.discard(last.prompt)
                    stats.undone += 1
                    redo.append((last.prompt, last.responses))
                else:
                    labeler.notice("nothing to undo")
                continue
            except Quit:
                stats.quit = True
                break
            log.append(Ranking(prompt, tuple(responses), tuple(ranking), labeler.scores(prompt, responses)))
            done.add(prompt)
            stats.labeled += 1
        stats.total = len(log.records)
    return stats


LABELERS: dict[str, type[Labeler]] = {c.name: c for c in (JsonlLabeler, TerminalLabeler)}


def labeler_names() -> list[str]:
    """Every task's scripted labeler (by the task's name) and the jsonl and terminal labelers, sorted."""
    return sorted([*task_names(), *LABELERS])


def make_labeler(name: str, **kwargs: object) -> Labeler:
    """The labeler registered under name: a task's name gives its scripted labeler; jsonl needs path=..."""
    if name in task_names():
        return ScoreLabeler(name, task_module(name).preference, **kwargs)
    if name not in LABELERS:
        raise ValueError(f"unknown labeler {name!r}; valid names: {', '.join(labeler_names())}")
    return LABELERS[name](**kwargs)
