"""The optimisation loop every trainer shares (pretrain, SFT, reward model): learning-rate schedule,
accumulated and clipped steps, a progress bar, JSONL log lines, periodic evaluation and checkpoints,
an optional wall-clock budget. A trainer supplies the model, `micro_loss` and `evaluate`; the loop owns
the step counter. Data streams that are a pure function of (step, micro-batch) — see `EpochStream` —
make a resumed run repeat an uninterrupted one exactly (the checkpoint restores torch's RNG for dropout).
Under torchrun (train.dist) the model is DDP-wrapped, each rank computes its share of every batch, the
logged loss is the mean over the ranks and rank 0 alone logs and writes checkpoints."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

import torch
from torch import Tensor, nn

from fastrlhf.train import dist
from fastrlhf.train.log import JSONLLogger, NullLogger, Progress
from fastrlhf.train.optim import OptimConfig, lr_at, optimizer_step

T = TypeVar("T")


@dataclass
class LoopConfig:
    """[train] fields every trainer shares; pretrain, SFT and RM configs extend it with their own."""

    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    log_interval: int = 10
    """Print and log training stats every this many steps."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept."""
    seed: int = 1337
    """Seeds the weights not loaded from a checkpoint, the data order and dropout."""
    device: str = "auto"
    """'cpu', 'cuda', or 'auto' (cuda when available)."""
    dtype: str = "bf16"
    """Autocast dtype on GPU: 'bf16', 'fp16' or 'fp32' (the CPU always computes in fp32)."""
    threads: int = 0
    """torch CPU threads; 0 = torch's default."""
    max_minutes: float = 0.0
    """Wall-clock budget for this invocation (stop early with a checkpoint when spent); 0 = none."""

    def check_at_least_one(self, *names: str) -> None:
        for name in ("grad_accum", "log_interval", *names):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1; got {getattr(self, name)}")
        if self.dtype not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"train.dtype must be 'bf16', 'fp16' or 'fp32'; got {self.dtype!r}")


class LoopSettings(Protocol):
    """The fields of a trainer's [train] table the loop reads (pretrain's TrainConfig has them all)."""

    max_steps: int
    grad_accum: int
    log_interval: int
    eval_interval: int
    ckpt_interval: int
    max_minutes: float
    device: str
    threads: int
    seed: int


def resolve_device(t: LoopSettings) -> torch.device:
    """train.device ('auto' = cuda when available) as a torch.device; applies train.threads. Under
    torchrun this joins the process group and gives this rank's device (dist.setup)."""
    return dist.setup(t.device, t.threads)


def run_outputs(
    out: Path, total: int, initial: int, desc: str, quiet: bool
) -> tuple[JSONLLogger, Progress, Callable[[str], None]]:
    """The run's log.jsonl, progress bar and printer: real on rank 0, silent on the other ranks."""
    loud = dist.is_main() and not quiet
    logger = JSONLLogger(out / "log.jsonl") if dist.is_main() else NullLogger()
    progress = Progress(total, initial=initial, desc=desc, enabled=None if loud else False)
    return logger, progress, (progress.say if loud else lambda s: None)


def run_loop(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    optim: OptimConfig,
    t: LoopSettings,
    step: int,
    micro_loss: Callable[[int, int], Tensor],
    evaluate: Callable[[], dict[str, float]],
    save: Callable[[int], None],
    logger: JSONLLogger,
    progress: Progress,
    say: Callable[[str], None],
    tokens_per_step: int | Callable[[], int],
) -> dict[str, float]:
    """Train from `step` to t.max_steps (or until t.max_minutes is spent). micro_loss(step, i) is the
    loss of micro-batch i < grad_accum of optimizer step `step` (0-based); evaluate() returns named
    validation metrics (logged, printed, and returned with the last train loss); save(step) checkpoints.
    Under torchrun: `model` is the DDP wrapper, micro_loss gives this rank's share of the loss (so that
    the mean over the ranks is the global batch's loss), evaluate and save are called on every rank."""
    model.train()
    last: dict[str, float] = {}
    t_start = time.perf_counter()
    deadline = t_start + t.max_minutes * 60 if t.max_minutes > 0 else float("inf")
    while step < t.max_steps:
        lr = lr_at(step, optim, t.max_steps)
        s = step
        if dist.active():  # dropout masks: a pure function of (seed, step, rank), so resume repeats them
            torch.manual_seed(dist.stream_seed(t.seed, "dropout", step))
        loss, norm = optimizer_step(
            model, optimizer, lambda i: micro_loss(s, i), t.grad_accum, lr, optim.grad_clip
        )
        loss = dist.mean_float(loss)
        step += 1
        rate = progress.update(tokens_per_step() if callable(tokens_per_step) else tokens_per_step, loss=loss)
        last["loss"] = loss
        late = deadline < float("inf") and dist.any_rank(
            time.perf_counter() > deadline
        )  # all ranks stop alike
        final = step == t.max_steps or late
        if final and step < t.max_steps:
            say(f"train.max_minutes ({t.max_minutes}) spent: stopping at step {step} of {t.max_steps}")
        if step % t.log_interval == 0 or final:
            dt = time.perf_counter() - t_start
            logger.log(step=step, loss=loss, lr=lr, grad_norm=norm, tokens_per_s=rate, time_s=dt)
            say(f"step {step:>6}  loss {loss:.4f}  lr {lr:.2e}  grad_norm {norm:.3f}  {rate:,.0f} tok/s")
        if step % t.eval_interval == 0 or final:
            metrics = evaluate()
            model.train()
            last.update(metrics)
            logger.log(step=step, **metrics)
            say(f"step {step:>6}  " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if (t.ckpt_interval and step % t.ckpt_interval == 0) or final:
            save(step)
        if final:
            break
    progress.close()
    logger.close()
    return last


class EpochStream(Generic[T]):
    """An endless stream of items, epoch after epoch, each epoch a fresh list made by make_epoch(epoch)
    (e.g. a seeded shuffle, then packing). take(start, n) is items [start, start + n) of the stream: a
    pure function of its arguments, so a trainer reads micro-batch (step, i) without carrying state."""

    def __init__(self, make_epoch: Callable[[int], Sequence[T]]):
        self._make = make_epoch
        self._epochs: dict[int, Sequence[T]] = {}
        self._starts = [0]  # _starts[e] = stream index of epoch e's first item

    def _epoch(self, e: int) -> Sequence[T]:
        if e not in self._epochs:
            items = self._make(e)
            if not items:
                raise ValueError(f"epoch {e} of the training data is empty")
            self._epochs = {k: v for k, v in self._epochs.items() if k >= e - 1}  # keep memory flat
            self._epochs[e] = items
        return self._epochs[e]

    def take(self, start: int, n: int) -> list[T]:
        while len(self._starts) < 2 or self._starts[-1] <= start + n:  # learn epoch boundaries as needed
            e = len(self._starts) - 1
            self._starts.append(self._starts[-1] + len(self._epoch(e)))
        out: list[T] = []
        for i in range(start, start + n):
            e = next(k for k in range(len(self._starts) - 1) if self._starts[k] <= i < self._starts[k + 1])
            out.append(self._epoch(e)[i - self._starts[e]])
        return out


def shuffled(items: Sequence[T], seed: int, epoch: int) -> list[T]:
    """items in the order of epoch `epoch` of run seed `seed` (the same in every process)."""
    order = list(items)
    random.Random(f"{seed}/{epoch}").shuffle(order)
    return order
