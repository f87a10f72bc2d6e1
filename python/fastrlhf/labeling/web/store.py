"""The web labeler's state: who gets which prompt, what is saved, progress, and the merged rankings file.

Several people label at once. Each has a name and an append-only log, <labels_dir>/<name>.jsonl
(labels.py), written with one fsync per event before the request is answered, so an acknowledged label
survives a kill -9. A prompt goes to `labels_per_prompt` different people: a labeler asking for work gets
the first prompt (in answers-file order) that they have not labeled and that has fewer than N rankings plus
other people's open leases (a prompt on someone's screen, held for LEASE_S). Skips do not fill a slot.
The merged rankings file (data.formats rankings, what the reward model reads) is every live ranking of
every labeler, rewritten atomically within a second of a change, and in full at start and at close.
Locks: one per labeler (its log and labels), then the store's (counts and leases); never the other way.
"""

from __future__ import annotations

import fcntl
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastrlhf.data.formats import JsonlAppender, PathLike, Ranking, write_rankings
from fastrlhf.labeling.web.answers import AnswerItem
from fastrlhf.labeling.web.labels import Label, parse_log

__all__ = ["FLAGS", "LEASE_S", "LabelStore", "RequestError"]

FLAGS = ("harmful", "unreadable", "off-topic")
"""what a labeler can flag an item as (stored with the ranking or skip)"""
LEASE_S = 600.0
"""how long a prompt shown to one labeler is kept from others (labels_per_prompt counts it as taken)"""
MAX_REASON = 500
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}")
SID = re.compile(r"[A-Za-z0-9_-]{8,64}")


class RequestError(ValueError):
    """A request the store refuses; `status` is the HTTP status the server answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise RequestError(
            400,
            f"labeler must be a name of 1-40 letters, digits, '_', '.' or '-' (starting with a letter or digit); got {name!r:.60}",
        )
    return name


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class _Labeler:
    name: str
    path: Path
    labels: list[Label] = field(default_factory=list)
    sids: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    current: str | None = None  # the prompt id on this labeler's screen
    _out: JsonlAppender | None = None

    def by_prompt(self) -> set[str]:
        return {x.prompt_id for x in self.labels}

    def append(self, obj: dict[str, Any]) -> None:
        if self._out is None:
            self._out = JsonlAppender(self.path)
        self._out.append(obj)  # one write + fsync: returns once the line is on disk

    def close(self) -> None:
        if self._out is not None:
            self._out.close()


class LabelStore:
    """Thread-safe: the server calls next/submit/undo from its worker threads."""

    def __init__(
        self,
        items: Sequence[AnswerItem],
        labels_dir: PathLike,
        merged_path: PathLike,
        *,
        labels_per_prompt: int = 1,
        merge_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if labels_per_prompt < 1:
            raise ValueError(f"labels_per_prompt must be >= 1; got {labels_per_prompt}")
        if not items:
            raise ValueError("there are no prompts to label (the answers file is empty)")
        self.items = {it.id: it for it in items}
        self._order = {pid: i for i, pid in enumerate(self.items)}
        self.labels_dir, self.merged_path = Path(labels_dir), Path(merged_path)
        self.n = labels_per_prompt
        self._clock = clock
        self._lock = threading.Lock()
        self._labelers: dict[str, _Labeler] = {}
        self._counts = dict.fromkeys(self.items, 0)  # live rankings per prompt
        self._leases: dict[str, dict[str, float]] = {}  # prompt id -> {labeler: lease end}
        self.dropped_tails: dict[str, int] = {}  # labeler -> bytes of a torn last line removed at start
        if self.merged_path.exists() and not self.labels_dir.is_dir():
            raise ValueError(
                f"{self.merged_path} exists but {self.labels_dir} does not: it was not written by the web "
                "labeler and would be overwritten; choose another output file"
            )
        self.labels_dir.mkdir(parents=True, exist_ok=True)
        # one server per labels folder: a second would interleave the logs (the kernel drops the lock when
        # the holder dies, kill -9 included)
        self._lock_fd = os.open(self.labels_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise RuntimeError(f"another label server is using {self.labels_dir}") from None
        try:
            self._load()
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._merge_interval = merge_interval_s
        self._dirty, self._stop = threading.Event(), threading.Event()
        self.write_merged()
        self._merger = threading.Thread(target=self._merge_loop, name="merge-rankings", daemon=True)
        self._merger.start()

    # --- loading and the merged file ------------------------------------------------------------------

    def _load(self) -> None:
        for path in sorted(self.labels_dir.glob("*.jsonl")):
            if not NAME.fullmatch(path.stem):
                continue
            log = parse_log(path.read_bytes(), path)
            if log.torn_tail:  # a write cut off by a kill before it was acknowledged: drop it
                os.truncate(path, path.stat().st_size - log.torn_tail)
                self.dropped_tails[path.stem] = log.torn_tail
            self._labelers[path.stem] = _Labeler(path.stem, path, log.labels, log.sids)
            for x in log.labels:
                if x.ranking is not None and x.prompt_id in self._counts:
                    self._counts[x.prompt_id] += 1

    def rankings(self) -> list[Ranking]:
        """Every live ranking of every labeler: by prompt (answers-file order), then labeler name."""
        rows = []
        with self._lock:
            labelers = sorted(self._labelers.items())
        for name, lab in labelers:
            with lab.lock:
                labels = list(lab.labels)
            for j, x in enumerate(labels):
                if x.ranking is not None:
                    rows.append(((self._order.get(x.prompt_id, len(self._order)), name, j), x.as_ranking()))
        return [r for _, r in sorted(rows, key=lambda row: row[0])]

    def write_merged(self) -> None:
        write_rankings(self.merged_path, self.rankings())  # atomic: a reader sees the old or the new file

    def _merge_loop(self) -> None:
        while not self._stop.is_set():
            self._dirty.wait()
            self._dirty.clear()
            self.write_merged()
            self._stop.wait(self._merge_interval)  # at most one rewrite per interval under load

    def close(self) -> None:
        """Stop the merger, write the merged file in full, close the logs and release the folder."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._dirty.set()
        self._merger.join()
        self.write_merged()
        for lab in self._labelers.values():
            lab.close()
        os.close(self._lock_fd)

    # --- assignment and progress (callers hold lab.lock, then self._lock) ----------------------------

    def _labeler(self, name: Any) -> _Labeler:
        name = check_name(name)
        with self._lock:
            if name not in self._labelers:
                self._labelers[name] = _Labeler(name, self.labels_dir / f"{name}.jsonl")
            return self._labelers[name]

    def _taken(self, pid: str, name: str) -> int:
        """Rankings of pid plus other labelers' open leases on it."""
        now = self._clock()
        leases = self._leases.get(pid, {})
        return self._counts[pid] + sum(1 for who, end in leases.items() if who != name and end > now)

    def _lease(self, lab: _Labeler, pid: str | None) -> None:
        if lab.current is not None:
            self._leases.get(lab.current, {}).pop(lab.name, None)
        lab.current = pid
        if pid is not None:
            self._leases.setdefault(pid, {})[lab.name] = self._clock() + LEASE_S

    def _progress(self, lab: _Labeler) -> dict[str, int]:
        done = lab.by_prompt()
        mine = sum(1 for pid in done if pid in self.items)
        left = sum(1 for pid, c in self._counts.items() if c < self.n and pid not in done)
        filled = sum(min(c, self.n) for c in self._counts.values())
        return {"done": mine, "total": mine + left, "filled": filled, "needed": self.n * len(self.items)}

    def _last(self, lab: _Labeler) -> dict[str, str] | None:
        return {"sid": lab.labels[-1].sid, "prompt_id": lab.labels[-1].prompt_id} if lab.labels else None

    # --- the three requests ---------------------------------------------------------------------------

    def next(self, name: Any) -> dict[str, Any]:
        """The labeler's current prompt (the same one until they submit, so a reload shows it again), or
        the next free one, or None when nothing is left for them; with their progress."""
        lab = self._labeler(name)
        with lab.lock, self._lock:
            done = lab.by_prompt()
            pid = lab.current
            if pid is None or pid in done or self._taken(pid, lab.name) >= self.n:
                pid = next(
                    (p for p in self.items if p not in done and self._taken(p, lab.name) < self.n), None
                )
            self._lease(lab, pid)
            item = None if pid is None else self.items[pid].to_json()
            return {"item": item, "progress": self._progress(lab), "last": self._last(lab), "flags": FLAGS}

    def submit(
        self,
        name: Any,
        sid: Any,
        prompt_id: Any,
        *,
        ranking: Any = None,
        skip: Any = None,
        flags: Any = (),
    ) -> dict[str, Any]:
        """Store a ranking (or a skip, with an optional reason) of prompt_id by `name`. A sid already
        stored is answered as saved without storing it again (a retry)."""
        lab = self._labeler(name)
        if not isinstance(sid, str) or not SID.fullmatch(sid):
            raise RequestError(400, f"sid must be 8-64 letters, digits, '_' or '-'; got {sid!r:.60}")
        with lab.lock:
            if sid in lab.sids:
                with self._lock:
                    return {"saved": True, "duplicate": True, "progress": self._progress(lab)}
            item = self.items.get(prompt_id) if isinstance(prompt_id, str) else None
            if item is None:
                raise RequestError(404, f"unknown prompt_id {prompt_id!r:.60}")
            checked = _checked(item, ranking, skip, flags)
            label = Label(sid, lab.name, item.id, item.prompt, item.responses, time=_now_iso(), **checked)
            if item.id in lab.by_prompt():
                raise RequestError(409, f"you already labeled {item.id}; undo it first to change it")
            if label.ranking is not None:
                with self._lock:  # reserve the slot before the (slow) write
                    if lab.current != item.id and self._taken(item.id, lab.name) >= self.n:
                        raise RequestError(409, f"{item.id} already has {self.n} labels; reload for another")
                    self._counts[item.id] += 1
            try:
                lab.append(label.to_json())
            except BaseException:
                if label.ranking is not None:
                    with self._lock:
                        self._counts[item.id] -= 1
                raise
            lab.labels.append(label)
            lab.sids.add(sid)
            with self._lock:
                if lab.current == item.id:
                    self._lease(lab, None)
                self._dirty.set()
                return {"saved": True, "duplicate": False, "progress": self._progress(lab)}

    def undo(self, name: Any, sid: Any, target: Any) -> dict[str, Any]:
        """Cancel the labeler's last live label, which must be `target` (the sid the page shows as the last
        submission: an undo from a stale page is refused, not applied to something else). That prompt is
        then the labeler's current one again."""
        lab = self._labeler(name)
        if not isinstance(sid, str) or not SID.fullmatch(sid):
            raise RequestError(400, f"sid must be 8-64 letters, digits, '_' or '-'; got {sid!r:.60}")
        with lab.lock:
            if sid in lab.sids:
                with self._lock:
                    return {"undone": True, "duplicate": True, "progress": self._progress(lab)}
            if not lab.labels:
                raise RequestError(409, "nothing to undo")
            last = lab.labels[-1]
            if target != last.sid:
                raise RequestError(
                    409, f"your last submission is {last.prompt_id}, not {target!r:.60}; reload"
                )
            lab.append({"sid": sid, "labeler": lab.name, "undo": last.sid, "time": _now_iso()})
            lab.labels.pop()
            lab.sids.add(sid)
            with self._lock:
                if last.ranking is not None and last.prompt_id in self._counts:
                    self._counts[last.prompt_id] -= 1
                self._lease(lab, last.prompt_id if last.prompt_id in self.items else None)
                self._dirty.set()
                return {"undone": True, "duplicate": False, "progress": self._progress(lab)}


def _checked(item: AnswerItem, ranking: Any, skip: Any, flags: Any) -> dict[str, Any]:
    """ranking/skip/flags of a submission, checked: exactly one of ranking and skip."""
    k = len(item.responses)
    if (ranking is None) == (skip is None):
        raise RequestError(400, "give either 'ranking' (answer indices, best first) or 'skip' (a reason)")
    if ranking is not None:
        ok = isinstance(ranking, list) and all(type(i) is int for i in ranking)
        if not ok or sorted(ranking) != list(range(k)):
            raise RequestError(
                422,
                f"ranking must be a permutation of 0..{k - 1} (each answer once, best first); got {ranking!r:.80}",
            )
    elif not isinstance(skip, str) or len(skip) > MAX_REASON:
        raise RequestError(400, f"skip must be a reason of at most {MAX_REASON} characters (may be empty)")
    if (
        not isinstance(flags, (list, tuple))
        or any(f not in FLAGS for f in flags)
        or len(set(flags)) < len(flags)
    ):
        raise RequestError(400, f"flags must be distinct names from {', '.join(FLAGS)}; got {flags!r:.80}")
    return {
        "ranking": None if ranking is None else tuple(ranking),
        "skip": skip,
        "flags": tuple(f for f in FLAGS if f in flags),
    }
