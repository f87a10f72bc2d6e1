"""Run logging: one JSON object per line (machine-readable; resumed runs append) and a progress bar
with tokens/s on the terminal (plain lines when stderr is not a terminal)."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


class JSONLLogger:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a")  # noqa: SIM115 (held open for the run; close() ends it)

    def log(self, **record: Any) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._f.write(json.dumps(clean) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class NullLogger(JSONLLogger):
    """A logger that writes nothing: the other ranks' stand-in under torchrun (rank 0 logs)."""

    def __init__(self) -> None:
        pass

    def log(self, **record: Any) -> None:
        pass

    def close(self) -> None:
        pass


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a JSONL file. A last line cut short (a kill mid-write) is dropped with a warning that
    names the file; a broken line elsewhere is an error naming the file and the line."""
    with open(path) as f:
        lines = [(i, line) for i, line in enumerate(f, start=1) if line.strip()]
    rows = []
    for i, line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i == lines[-1][0] and not line.endswith("\n"):
                print(f"warning: {path}: dropped a half-written last line ({i}): {exc}", file=sys.stderr)
                break
            raise ValueError(f"{path} line {i} is not JSON: {exc}") from None
    return rows


class Progress:
    """A tqdm bar over steps showing loss and tokens/s; `say` prints a line above it."""

    def __init__(self, total: int, initial: int = 0, desc: str = "train", enabled: bool | None = None):
        enabled = sys.stderr.isatty() if enabled is None else enabled
        self.bar = tqdm(
            total=total,
            initial=initial,
            desc=desc,
            disable=not enabled,
            dynamic_ncols=True,
            unit="step",
            file=sys.stderr,
        )
        self._t0, self._tokens = time.perf_counter(), 0

    def update(self, tokens: int, **stats: float) -> float:
        """Advance one step of `tokens` tokens; returns tokens/s since the bar started."""
        self._tokens += tokens
        rate = self._tokens / max(time.perf_counter() - self._t0, 1e-9)
        self.bar.set_postfix(
            {k: f"{v:.4g}" for k, v in stats.items()} | {"tok/s": f"{rate:,.0f}"}, refresh=False
        )
        self.bar.update(1)
        return rate

    def say(self, line: str) -> None:
        tqdm.write(line, file=sys.stdout)

    def close(self) -> None:
        self.bar.close()
