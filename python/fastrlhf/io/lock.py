"""One writer per run folder: an OS file lock on `<run>/.lock`, held by the process that writes the run.

flock(2) locks belong to the open file, so the kernel drops the lock on any exit of the holder, kill -9
included: a lock file left by a dead process is stale by construction and the next writer simply takes it.
The file records the holder's pid and command line, so a second writer stops at once with a message that
names them (two `sft` runs in one folder, two `label` runs on one --out, two pipelines on one run)."""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path
from typing import ClassVar, Self

LOCK_FILE = ".lock"


class RunLockedError(RuntimeError):
    """Another live process holds the run folder's lock."""


class RunLock:
    """`with RunLock(run_dir):` holds run_dir's lock for the block (or call acquire/release). Re-entrant
    within one process: a stage that locks the folder its pipeline already holds goes on."""

    _held: ClassVar[dict[str, int]] = {}  # resolved lock path -> nesting depth, for this process

    def __init__(self, run_dir: str | os.PathLike, what: str = "run"):
        self.path = Path(run_dir) / LOCK_FILE
        self.target, self.what = Path(run_dir), what
        self._fd = -1

    @classmethod
    def for_file(cls, path: str | os.PathLike, what: str) -> RunLock:
        """The lock of one output file (`label --out`): `.<name>.lock` beside it."""
        lock = cls(Path(path).parent, what)
        lock.path, lock.target = Path(path).parent / f".{Path(path).name}.lock", Path(path)
        return lock

    def acquire(self) -> Self:
        key = str(self.path.resolve())
        if RunLock._held.get(key):
            RunLock._held[key] += 1
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(
                f"{self.target} is being written by another process ({holder}); "
                f"two writers would mix their {self.what}s: wait for it to finish or stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {' '.join(sys.argv)[:300]}\n".encode(), 0)
        self._fd = fd
        RunLock._held[key] = 1
        return self

    def release(self) -> None:
        key = str(self.path.resolve())
        depth = RunLock._held.get(key, 0)
        if depth > 1:
            RunLock._held[key] = depth - 1
            return
        RunLock._held.pop(key, None)
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
