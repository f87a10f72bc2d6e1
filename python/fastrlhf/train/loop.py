"""The loop every trainer shares (pretrain, SFT, reward model, PPO): the step counter, a progress bar,
JSONL log lines, periodic evaluation and checkpoints, an optional wall-clock budget. A trainer supplies
its step (`offline_step` builds the offline trainers' learning-rate schedule and accumulated, clipped
update around their `micro_loss`; PPO's is a rollout and its minibatch updates), `evaluate` and `save`. Data streams that are a pure function of (step, micro-batch) — see `EpochStream` —
make a resumed run repeat an uninterrupted one exactly (the checkpoint restores torch's RNG for dropout).
Under torchrun (train.dist) the model is DDP-wrapped, each rank computes its share of every batch, the
logged loss is the mean over the ranks and rank 0 alone logs and writes checkpoints. What the loop does when
a step goes non-finite or Ctrl-C comes is train/guard.py's (docs/reliability.md)."""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor, nn

from fastrlhf.config import check_choice, check_range
from fastrlhf.io.checkpoint import latest_checkpoint, remove_partial
from fastrlhf.io.files import atomic_write_text
from fastrlhf.io.lock import RunLock
from fastrlhf.train import dist
from fastrlhf.train.guard import (
    MAX_NONFINITE,
    OFFLINE_CAUSES,
    Interrupted,
    NonFiniteGuard,
    StopOnSigint,
    finite_weights,
)
from fastrlhf.train.log import JSONLLogger, NullLogger, Progress, read_jsonl
from fastrlhf.train.optim import OptimConfig, lr_at, optimizer_step

T = TypeVar("T")


DTYPES = ("auto", "bf16", "fp16", "fp32")


@dataclass
class LoopConfig:
    """[train] fields every trainer shares; pretrain, SFT, RM and PPO configs extend it with their own."""

    max_steps: int = 100
    """Optimizer steps (PPO: rollout + update steps) in the whole run."""
    ckpt_interval: int = 100
    """Checkpoint every this many steps (and at the end); 0 = only at the end."""
    log_interval: int = 10
    """Print and log training stats every this many steps."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept."""
    seed: int = 1337
    """Seeds the weights not loaded from a checkpoint, the data order and dropout."""
    device: str = "auto"
    """'cpu', 'cuda', or 'auto' (cuda when available)."""
    dtype: str = "auto"
    """Autocast: 'auto' (bf16 on GPU, fp32 on CPU), 'bf16' (on CPU too: fast where the CPU has AVX512-BF16
    or AMX), 'fp16' (GPU only) or 'fp32'. Losses, softmax and optimizer state stay fp32."""
    threads: int = 0
    """torch CPU threads; 0 = torch's default."""
    max_minutes: float = 0.0
    """Wall-clock budget for this invocation (stop early with a checkpoint when spent); 0 = none."""
    tensorboard: bool = False
    """Also write TensorBoard scalars to out_dir/tb (needs the tensorboard package)."""

    def check_at_least_one(self, *names: str) -> None:
        for name in ("max_steps", "log_interval", *names):
            check_range(f"train.{name}", getattr(self, name), 1, float("inf"))
        for name in ("ckpt_interval", "keep_checkpoints", "threads"):
            check_range(f"train.{name}", getattr(self, name), 0, float("inf"))
        check_range("train.max_minutes", self.max_minutes, 0.0, float("inf"), hi_open=True)
        check_choice("train.dtype", self.dtype, DTYPES)
        check_choice("train.device", self.device.split(":")[0], ("auto", "cpu", "cuda"))


@dataclass
class OfflineLoopConfig(LoopConfig):
    """The loop of the trainers that step on batches of data (pretrain, SFT, RM): accumulated micro-batches."""

    grad_accum: int = 1
    """Micro-batches per optimizer step."""

    def check_at_least_one(self, *names: str) -> None:
        super().check_at_least_one("grad_accum", *names)


def resolve_device(t: LoopConfig) -> torch.device:
    """train.device ('auto' = cuda when available) as a torch.device; applies train.threads. Under
    torchrun this joins the process group and gives this rank's device (dist.setup)."""
    return dist.setup(t.device, t.threads)


@dataclass
class Outputs:
    """Where a run reports: log.jsonl, the progress bar, printed lines, TensorBoard (real on rank 0 only)."""

    logger: JSONLLogger
    progress: Progress
    say: Callable[[str], None]
    out: Path
    guard: NonFiniteGuard
    """The offline trainers' non-finite step counter (the online ones keep theirs, rl/trainer.py)."""
    tensorboard: Any = None
    lock: RunLock | None = None

    def close(self) -> None:
        self.progress.close()
        self.logger.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.lock is not None:
            self.lock.release()


def run_outputs(out: Path, t: LoopConfig, initial: int, desc: str, quiet: bool) -> Outputs:
    """The run's outputs from step `initial` on. Log rows past `initial` (written after the checkpoint the
    run resumes from, or before a first checkpoint that never came, by the process that was killed) are
    dropped first, so no step is logged twice; so are partial checkpoint folders a kill or a full disk left.
    Rank 0 holds the run folder's lock until close(): a second process writing the same folder stops here,
    naming the holder (io/lock.py)."""
    main = dist.is_main()
    loud = main and not quiet
    lock = RunLock(out).acquire() if main else None
    rows = truncate_log(out / "log.jsonl", initial) if main else []
    if main:
        remove_partial(out)
    logger = JSONLLogger(out / "log.jsonl") if main else NullLogger()
    progress = Progress(t.max_steps, initial=initial, desc=desc, enabled=None if loud else False)
    skipped = [r["nonfinite_steps"] for r in rows if r.get("nonfinite_steps") is not None]
    return Outputs(
        logger,
        progress,
        progress.say if loud else lambda s: None,
        out,
        NonFiniteGuard("training", MAX_NONFINITE, out, OFFLINE_CAUSES, total=skipped[-1] if skipped else 0),
        _tensorboard(out) if t.tensorboard and main else None,
        lock,
    )


@dataclass
class StepResult:
    """What one step of a trainer gives the loop."""

    metrics: dict[str, float]
    """Logged (with the step, tokens/s and seconds) every log_interval steps."""
    tokens: int
    """Tokens this step trained on (the progress bar's rate)."""
    show: dict[str, float]
    """The progress bar's postfix and the printed line's numbers."""
    skipped: str | None = None
    """'' or why the step applied no update (offline trainers: the loop counts it, outputs.guard); None
    for the online trainers, which count their own."""


def run_loop(
    *,
    t: LoopConfig,
    step: int,
    train_step: Callable[[int], StepResult],
    save: Callable[[int], None],
    outputs: Outputs,
    evaluate: Callable[[], dict[str, float]] | None = None,
    model: nn.Module | None = None,
    eval_interval: int = 0,
) -> dict[str, float]:
    """Train from `step` to t.max_steps (or until t.max_minutes is spent) for every trainer: train_step(s)
    runs optimizer step s (0-based) and returns its StepResult; every log_interval steps a log row and a
    printed line, every eval_interval steps evaluate() (validation metrics, logged and printed), every
    ckpt_interval steps and at the end save(step). Returns the last step's metrics and the last
    evaluation's. `model` is put back in train mode after each evaluation (PPO, which trains in eval
    mode, passes none). A skipped step (StepResult.skipped) is always logged and is no place for a
    checkpoint (the next good step writes the one due); outputs.guard aborts after MAX_NONFINITE in a row,
    and at once when `model`'s weights went non-finite (which are never saved).
    Ctrl-C stops at the next step boundary with a checkpoint and raises Interrupted. Under torchrun every
    rank runs this; the outputs are rank 0's."""
    if model is not None:
        model.train()
    last: dict[str, float] = {}
    t_start = time.perf_counter()
    deadline = t_start + t.max_minutes * 60 if t.max_minutes > 0 else float("inf")
    log, say, guard = outputs.logger, outputs.say, outputs.guard
    due = False  # a checkpoint put off by a skipped step

    def checked_save(at: int) -> None:
        if model is not None and not finite_weights(model):
            raise guard.weights_error(at)
        save(at)

    with StopOnSigint() as sigint, _closing(outputs):
        while step < t.max_steps:
            result = train_step(step)
            step += 1
            if result.skipped:
                if model is not None and not finite_weights(model):
                    raise guard.weights_error(step)
                say(f"step {step:>6}  skipped: {result.skipped}")
            abort = guard.count(step, result.skipped) if result.skipped is not None else None
            rate = outputs.progress.update(result.tokens, **result.show)
            last.update(result.metrics)
            late = deadline < float("inf") and dist.any_rank(
                time.perf_counter() > deadline
            )  # all ranks stop alike
            stop = dist.any_rank(sigint.requested)
            final = step == t.max_steps or late or stop
            if late and step < t.max_steps:
                say(f"train.max_minutes ({t.max_minutes}) spent: stopping at step {step} of {t.max_steps}")
            if step % t.log_interval == 0 or final or result.skipped:
                row = {"step": step, **result.metrics}
                if result.skipped is not None:
                    row["nonfinite_steps"] = guard.total
                row.setdefault("tokens_per_s", rate)
                row["time_s"] = time.perf_counter() - t_start
                log.log(**row)
                _scalars(outputs.tensorboard, row)
                say(
                    f"step {step:>6}  "
                    + "  ".join(f"{k} {v:.4g}" for k, v in result.show.items())
                    + f"  {rate:,.0f} tok/s"
                )
            if abort is not None:
                raise abort  # after its step's log row
            if evaluate is not None and not stop and (step % eval_interval == 0 or final):
                metrics = evaluate()
                if model is not None:
                    model.train()
                last.update(metrics)
                log.log(step=step, **metrics)
                _scalars(outputs.tensorboard, {"step": step, **metrics})
                say(f"step {step:>6}  " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            due = due or bool(t.ckpt_interval and step % t.ckpt_interval == 0) or final
            if due and not result.skipped:
                checked_save(step)
                due = False
            elif due and final:
                say(f"step {step} was skipped (non-finite): no checkpoint for it; a rerun repeats it")
            if stop:
                resume = latest_checkpoint(outputs.out) or "the start"
                raise Interrupted(
                    f"interrupted at step {step} of {t.max_steps}: the same command resumes from {resume}"
                )
            if final:
                break
    return last


@contextlib.contextmanager
def _closing(outputs: Outputs) -> Iterator[None]:
    """outputs.close() however the loop ends (the lock, the log file, the progress bar)."""
    try:
        yield
    finally:
        outputs.close()


def offline_step(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    optim: OptimConfig,
    t: Any,
    micro_loss: Callable[[int, int], Tensor],
    tokens_per_step: int | Callable[[], int],
) -> Callable[[int], StepResult]:
    """The step of the offline trainers: micro_loss(step, i) is the loss of micro-batch i < grad_accum of
    optimizer step `step`; the learning rate follows the schedule, the gradients are accumulated, clipped
    and applied. Under torchrun `model` is the DDP wrapper and micro_loss gives this rank's share of the
    loss (so that the mean over the ranks is the global batch's loss)."""

    def train_step(step: int) -> StepResult:
        lr = lr_at(step, optim, t.max_steps)
        if dist.active():  # dropout masks: a pure function of (seed, step, rank), so resume repeats them
            torch.manual_seed(dist.stream_seed(t.seed, "dropout", step))
        loss, norm = optimizer_step(
            model, optimizer, lambda i: micro_loss(step, i), t.grad_accum, lr, optim.grad_clip
        )
        finite = math.isfinite(loss) and math.isfinite(norm)
        skipped = "" if finite else f"non-finite loss ({loss:.4g}) or gradient norm ({norm:.4g}), no update"
        tokens = tokens_per_step() if callable(tokens_per_step) else tokens_per_step
        return StepResult(
            {"loss": loss, "lr": lr, "grad_norm": norm},
            tokens,
            {"loss": loss, "lr": lr, "grad_norm": norm},
            skipped,
        )

    return train_step


def truncate_log(path: Path, step: int) -> list[dict[str, Any]]:
    """Keep the rows of log.jsonl up to `step` (a run starting from that step's checkpoint; none for a
    run starting from scratch at 0) and return them."""
    if not path.is_file():
        return []
    rows = [r for r in read_jsonl(path) if r.get("step", 0) <= step] if step > 0 else []
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _tensorboard(out: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ValueError(
            "train.tensorboard = true needs the tensorboard package (pip install tensorboard)"
        ) from exc
    return SummaryWriter(str(out / "tb"))


def _scalars(tb: Any, row: dict[str, Any]) -> None:
    for k, v in row.items() if tb is not None else ():
        if k != "step" and isinstance(v, (int, float)):
            tb.add_scalar(k, v, row["step"])


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
