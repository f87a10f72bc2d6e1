"""The run folder runs/NAME: one subfolder per stage with STAGE.json (the fingerprint of the settings it was
started with) and, once finished, DONE.json (fingerprint, seconds, summary); config.json beside them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from fastrlhf.io.files import atomic_write_text
from fastrlhf.pipeline.config import STAGES, PipelineConfig, fingerprints


class Run:
    """The folder runs/NAME: one subfolder per stage with STAGE.json (fingerprint) and, once finished,
    DONE.json (fingerprint, seconds, summary)."""

    def __init__(self, out: str | Path, cfg: PipelineConfig):
        self.out, self.cfg, self.prints = Path(out), cfg, fingerprints(cfg)

    def dir(self, stage: str) -> Path:
        return self.out / stage

    def done(self, stage: str) -> dict[str, Any] | None:
        path = self.dir(stage) / "DONE.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def check(self, stage: str) -> None:
        """Refuse a stage folder made with other settings than the current ones."""
        path = self.dir(stage) / "STAGE.json"
        if path.is_file() and json.loads(path.read_text())["fingerprint"] != self.prints[stage]:
            raise ValueError(
                f"{self.dir(stage)} was made with other settings (its [{stage}] table or an earlier stage's changed); "
                f"rerun with --redo {stage} to redo it and every later stage, or choose a new --out"
            )

    def redo(self, stage: str) -> None:
        for later in STAGES[STAGES.index(stage) :]:
            shutil.rmtree(self.dir(later), ignore_errors=True)
        (self.out / "report.md").unlink(missing_ok=True)

    def start(self, stage: str) -> None:
        self.dir(stage).mkdir(parents=True, exist_ok=True)
        write_json(self.dir(stage) / "STAGE.json", {"fingerprint": self.prints[stage]})

    def finish(self, stage: str, seconds: float, summary: dict[str, Any]) -> None:
        write_json(
            self.dir(stage) / "DONE.json",
            {"fingerprint": self.prints[stage], "seconds": seconds, "summary": summary},
        )


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")
