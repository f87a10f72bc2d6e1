"""The skeleton every online RL algorithm shares (PPO, and the critic-free ones): a prompt pool walked in
seeded permutations, the sampling / shuffle / pretraining-batch generators, step and update counts, the
non-finite-step guard (a skipped step is undone as a whole: `update_or_undo`), resumable checkpoints and the
shared loop (train/loop.py). An algorithm subclasses
OnlineTrainer and writes `step()` (sample -> score -> advantages -> update, returning its metrics) and
what it adds to a checkpoint."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastrlhf.io import checkpoint as ckpt
from fastrlhf.models import CausalLM
from fastrlhf.models.load import lm_record
from fastrlhf.train import dist
from fastrlhf.train.guard import NonFiniteGuard, Snapshot
from fastrlhf.train.loop import LoopConfig, StepResult, run_loop, run_outputs

GENERATORS = ("sample", "shuffle", "ptx")  # seeded train.seed + 0, 1, 2


class OnlineTrainer:
    """State and loop shared by the online algorithms; subclasses set `optimizer`, `models` (name ->
    module, saved and restored; "model" is the policy) and `desc`, and define step() and show()."""

    desc = "rl"
    optimizer: torch.optim.Optimizer
    models: dict[str, nn.Module]

    def __init__(
        self,
        t: LoopConfig,
        policy: CausalLM,
        prompts: Sequence[Sequence[int]],
        batch: int,
        *,
        max_nonfinite: int,
        tokenizer: Any = None,
        quiet: bool = False,
    ):
        self.t, self.policy, self.batch = t, policy, batch
        self.prompts = [list(map(int, x)) for x in prompts]
        if not self.prompts:
            raise ValueError("prompts must hold at least one prompt; got none")
        self.tokenizer, self.quiet = tokenizer, quiet
        self.device = next(policy.parameters()).device
        if self.device.type == "cpu" and t.dtype in ("bf16", "fp16"):
            raise ValueError(
                f"train.dtype = {t.dtype!r} on the CPU: the sampler's log-probs (decoded a token at a time) and "
                f"the update's (one full forward) would differ by bf16 rounding, past the ratio == 1 check; "
                f"use 'auto' or 'fp32'"
            )
        self.gens = {name: torch.Generator().manual_seed(t.seed + i) for i, name in enumerate(GENERATORS)}
        self.step_count = self.prompts_seen = self.updates = 0
        causes = f"Lower optim.lr, check the reward's scores, or raise {self.desc}.max_nonfinite"
        self.guard = NonFiniteGuard(self.desc.upper(), max_nonfinite, t.out_dir, causes)  # type: ignore[attr-defined]
        self._perm_cache: tuple[int, list[int]] = (-1, [])

    def _next_prompts(self) -> list[list[int]]:
        """`batch` prompts in a fresh seeded permutation per pass over the pool (resumable by count)."""
        out, n = [], len(self.prompts)  # the global batch; step() keeps this rank's share
        for i in range(self.prompts_seen, self.prompts_seen + self.batch):
            epoch, j = divmod(i, n)
            if self._perm_cache[0] != epoch:
                g = torch.Generator().manual_seed(self.t.seed * 1_000_003 + epoch)
                self._perm_cache = (epoch, torch.randperm(n, generator=g).tolist())
            out.append(self.prompts[self._perm_cache[1][j]])
        self.prompts_seen += len(out)
        return out

    def seed_step(self) -> None:
        """Under torchrun, a stream per rank and step: ranks sample differently, a resume repeats them."""
        if dist.active():
            for name in ("sample", "ptx"):
                self.gens[name].manual_seed(dist.stream_seed(self.t.seed, name, self.step_count))

    def update_or_undo(
        self, update: Callable[[], tuple[dict[str, float], str]]
    ) -> tuple[dict[str, float], str]:
        """Run a step's update -> (stats, why): why = '' or why it stopped (a non-finite loss or gradient
        at some minibatch). A stopped update, or one that left non-finite weights, is undone as a whole: the
        trained weights, the optimizer's state and the update count go back to the step's start."""
        snapshot, updates = Snapshot(self.optimizer), self.updates
        stats, why = update()
        if not why and not snapshot.finite():
            why = "non-finite weights after the update"
        if why:
            snapshot.restore()
            self.updates = updates
            return {}, why
        return stats, why

    def count_step(self, why: str) -> None:
        """Count a finished step; why = '' or why its update was skipped (non-finite), which aborts after
        max_nonfinite in a row with a message naming the last cause."""
        self.step_count += 1
        undone = "its updates undone: weights and optimizer state restored to the step's start"
        abort = self.guard.count(self.step_count, why, undone)
        if abort is not None:
            raise abort

    # ---- what subclasses define ----------------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        raise NotImplementedError

    def show(self, m: dict[str, float]) -> tuple[int, dict[str, float]]:
        """(tokens this step trained on, the progress bar's numbers) of a step's metrics."""
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # ---- checkpoints and the loop ----------------------------------------------------------------------
    def save(self, out_dir: str | Path, config: dict[str, Any]) -> Path:
        trainer = {
            "step": self.step_count,
            "prompts_seen": self.prompts_seen,
            "updates": self.updates,
            "nonfinite_total": self.guard.total,
            "nonfinite_in_a_row": self.guard.in_a_row,
            **self.extra_state(),
        }
        return dist.save_checkpoint(
            out_dir,
            self.step_count,
            models=self.models,
            optimizers={"optim": self.optimizer},
            generators=self.gens,
            state={f"{self.desc}_config": config, "trainer": trainer},
            record=lm_record(self.policy),
            tokenizer=self.tokenizer,
            keep=self.t.keep_checkpoints,
        )

    def load(self, path: str | Path) -> None:
        """Restore everything save() wrote (weights, optimizer, RNGs, counters, the subclass's state)."""
        saved = ckpt.read_model_record(ckpt.read_state(path), path)["config"]
        if saved != self.policy.config.to_dict():
            raise ValueError(f"{path} holds a policy with config {saved}, not {self.policy.config.to_dict()}")
        meta = ckpt.load_checkpoint(
            path, models=self.models, optimizers={"optim": self.optimizer}, generators=self.gens
        )
        t = meta["state"]["trainer"]
        self.step_count, self.prompts_seen, self.updates = t["step"], t["prompts_seen"], t["updates"]
        self.guard.total, self.guard.in_a_row = t["nonfinite_total"], t["nonfinite_in_a_row"]
        self.load_extra_state(t)

    def train(self, config: dict[str, Any]) -> list[dict[str, float]]:
        """Run (or resume) to train.max_steps on the shared loop; returns the metrics of the steps it ran."""
        out = Path(self.t.out_dir)
        latest = ckpt.latest_checkpoint(out)
        if latest is not None:
            self.load(latest)
        history: list[dict[str, float]] = []

        def train_step(_step: int) -> StepResult:
            m = self.step()
            history.append(m)
            return StepResult(m, *self.show(m))

        run_loop(
            t=self.t,
            step=self.step_count,
            train_step=train_step,
            save=lambda _step: self.save(out, config),
            outputs=run_outputs(out, self.t, self.step_count, self.desc, self.quiet),
        )
        return history
