"""What every trainer does when training goes wrong (issue 22): a step with a non-finite loss or gradient
is skipped and counted, too many in a row abort with the likely cause and the last good checkpoint, weights
that went non-finite are never checkpointed, an online step that fails midway is undone (`Snapshot`), and
Ctrl-C ends the run at the next step boundary with a checkpoint (`StopOnSigint`)."""

from __future__ import annotations

import copy
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Self

import torch
from torch import nn

from fastrlhf.io import checkpoint as ckpt

MAX_NONFINITE = 3
"""Offline trainers: non-finite steps skipped in a row before the run aborts (a bad batch is skipped, a
diverged run stops). PPO and GRPO set theirs with ppo.max_nonfinite / grpo.max_nonfinite."""

OFFLINE_CAUSES = (
    "likely causes: optim.lr too high (or not finite), optim.weight_decay not finite, optim.grad_clip = 0 "
    "(no clipping)"
)


class NonFiniteError(RuntimeError):
    """Training produced non-finite numbers it cannot step past."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run at a step boundary after writing a checkpoint; str() is the one-line message."""


def last_good(out: str | Path) -> str:
    """Where a user restarts from: the run's newest checkpoint, or that there is none."""
    latest = ckpt.latest_checkpoint(out)
    if latest is None:
        return f"no checkpoint was written in {out} yet"
    return f"the last good checkpoint is {latest} (a rerun resumes from it)"


def finite_weights(model: nn.Module) -> bool:
    """Every parameter finite (one host sync)."""
    flags = [torch.isfinite(p).all() for p in model.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


class NonFiniteGuard:
    """Counts steps skipped for a non-finite loss, gradient or rollout; `max_in_a_row` in a row raise
    NonFiniteError naming the last cause, `causes` and the run's last good checkpoint."""

    def __init__(self, what: str, max_in_a_row: int, out: str | Path, causes: str, total: int = 0):
        self.what, self.max_in_a_row, self.out, self.causes = what, max_in_a_row, Path(out), causes
        self.total, self.in_a_row = total, 0

    def count(self, step: int, why: str, undone: str = "no update was applied") -> NonFiniteError | None:
        """Step `step` (1-based) finished; why = '' or why it was skipped. Returns the error that ends the
        run (the caller logs the step, then raises it), or None."""
        if not why:
            self.in_a_row = 0
            return None
        self.total, self.in_a_row = self.total + 1, self.in_a_row + 1
        if self.in_a_row < self.max_in_a_row:
            return None
        return NonFiniteError(
            f"{self.in_a_row} non-finite {self.what} steps in a row (last, step {step}: {why}); each was "
            f"skipped ({undone}); aborting. {self.causes}. {last_good(self.out)}"
        )

    def weights_error(self, step: int) -> NonFiniteError:
        return NonFiniteError(
            f"the weights are non-finite at step {step} (an update made them so); no checkpoint is written "
            f"from them. {self.causes}. {last_good(self.out)}"
        )


class Snapshot:
    """The trained parameters and the optimizer's state at the start of an online step, so that a step
    which turns non-finite midway (after some minibatch updates were applied) is undone as a whole.
    Costs one copy of the trained weights and of AdamW's moments, on their device."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.weights = [p.detach().clone() for p in self.params]
        self.state = copy.deepcopy(optimizer.state_dict())

    @torch.no_grad()
    def restore(self) -> None:
        for p, w in zip(self.params, self.weights):
            p.copy_(w)
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.load_state_dict(self.state)  # takes the snapshot's tensors over (used once)

    def finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.params)


class StopOnSigint:
    """`with StopOnSigint() as stop:` turns the first Ctrl-C (SIGINT) into `stop.requested`, which the
    loop reads at a step boundary (a checkpoint there is a consistent one); a second Ctrl-C interrupts at
    once. Outside the main thread (where signals cannot be caught) it does nothing."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the second Ctrl-C is a plain one

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
