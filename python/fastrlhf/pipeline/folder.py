"""The run folder runs/NAME: one subfolder per stage with STAGE.json (the fingerprint of the settings it was
started with) and, once finished, DONE.json (fingerprint, seconds, summary); config.json beside them."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from typing import Any

from fastrlhf.io.files import atomic_write_text
from fastrlhf.pipeline.config import ALGOS, STAGES, PipelineConfig, fingerprints


class Run:
    """The folder runs/NAME: one subfolder per stage with STAGE.json (fingerprint) and, once finished,
    DONE.json (fingerprint, seconds, summary). `algos`: the RL stages the eval compares."""

    def __init__(self, out: str | Path, cfg: PipelineConfig, algos: tuple[str, ...] = ("ppo",)):
        self.out, self.cfg, self.algos = Path(out), cfg, algos
        self.prints = fingerprints(cfg, algos)

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

    def refresh_eval(self) -> bool:
        """Delete the eval stage when only the algorithms it compares changed (its settings did not): it is
        remade from the finished RL stages. True when it was deleted."""
        path = self.dir("eval") / "STAGE.json"
        if not path.is_file() or json.loads(path.read_text())["fingerprint"] == self.prints["eval"]:
            return False
        saved = json.loads(path.read_text())["fingerprint"]
        subsets = (c for n in range(1, len(ALGOS) + 1) for c in itertools.combinations(ALGOS, n))
        if not any(fingerprints(self.cfg, c)["eval"] == saved for c in subsets):
            return False  # its own settings changed: check() refuses it
        shutil.rmtree(self.dir("eval"))
        return True

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
