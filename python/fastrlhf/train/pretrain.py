"""Step 0 of the recipe: next-token pretraining on a token file.

    python -m fastrlhf pretrain --config configs/pretrain_shakespeare.toml [section.field=value ...]

AdamW (decay on matrices), warmup + cosine, clipping, gradient accumulation, bf16 autocast on GPU,
periodic validation, a JSONL log + progress bar, and checkpoints a run resumes from bit-for-bit."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastrlhf.config import from_dict, to_dict
from fastrlhf.data import TokenFile, load_tokenizer, random_batch
from fastrlhf.io import checkpoint as ckpt
from fastrlhf.models import GPT, GPTConfig
from fastrlhf.models.families import TRAINING_BYTES, build_model
from fastrlhf.models.load import lm_record
from fastrlhf.train import dist
from fastrlhf.train.loop import OfflineLoopConfig, offline_step, resolve_device, run_loop, run_outputs
from fastrlhf.train.optim import OptimConfig, autocast_for, make_adamw


@dataclass
class TrainConfig(OfflineLoopConfig):
    """The loop around the model: data, batch, length, evaluation, checkpoints."""

    data_dir: str = "data/shakespeare"
    """Folder written by `python -m fastrlhf data` (train.bin, val.bin, tokenizer/)."""
    out_dir: str = "runs/pretrain"
    """Checkpoints and log.jsonl go here; an existing run there is resumed."""
    max_steps: int = 1000
    """Optimizer steps in the whole run (the cosine schedule ends here)."""
    batch_size: int = 16
    """Sequences per micro-batch, over all processes (each of N torchrun ranks reads batch_size / N)."""
    block_size: int = 0
    """Tokens per sequence; 0 = the model's block_size."""
    eval_interval: int = 100
    """Validation loss every this many steps (and at the end)."""
    eval_batches: int = 20
    """Micro-batches averaged for a validation loss (always the same windows)."""
    ckpt_interval: int = 200
    """Checkpoint every this many steps (and at the end); 0 = only at the end."""

    def __post_init__(self) -> None:
        self.check_at_least_one("max_steps", "batch_size", "eval_interval", "eval_batches")


@dataclass
class PretrainConfig:
    model: GPTConfig = field(default_factory=GPTConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@torch.no_grad()
def evaluate(model: GPT, tokens, cfg: TrainConfig, T: int, device: torch.device) -> float:
    """Mean loss over the same eval_batches windows every time (a fixed generator), in eval mode.
    Under torchrun rank r scores windows r, r + N, ... and the sums are added up."""
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    total = 0.0
    for i in range(cfg.eval_batches):
        x, y = random_batch(tokens, cfg.batch_size, T, gen)  # every rank draws, to keep the same windows
        if i % dist.world_size() == dist.rank():
            with autocast_for(device, cfg.dtype):
                total += model(x.to(device), y.to(device))[1].item()
    model.train()
    return float(dist.all_sum(torch.tensor(total, dtype=torch.float64))) / cfg.eval_batches


def pretrain(cfg: PretrainConfig, quiet: bool = False) -> dict[str, float]:
    """Train (or resume) the run cfg describes; returns the last train and val losses."""
    t = cfg.train
    device = resolve_device(t)
    data = Path(t.data_dir)
    train_tokens, val_tokens = TokenFile(data / "train.bin"), TokenFile(data / "val.bin")
    if train_tokens.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the data's vocab "
            f"({train_tokens.vocab_size}, {data})"
        )
    T = t.block_size or cfg.model.block_size
    if T > cfg.model.block_size:
        raise ValueError(f"train.block_size ({T}) must be <= model.block_size ({cfg.model.block_size})")
    tokenizer = load_tokenizer(data / "tokenizer")

    dist.check_divides("train.batch_size", t.batch_size)
    torch.manual_seed(t.seed)
    model = build_model(cfg.model, TRAINING_BYTES).to(device)
    optimizer = make_adamw(model, cfg.optim)
    data_gen = torch.Generator().manual_seed(t.seed)
    out = Path(t.out_dir)
    step = 0
    latest = ckpt.latest_checkpoint(out)
    if latest is not None:
        saved = from_dict(PretrainConfig, ckpt.read_state(latest)["state"]["config"])
        if saved.model != cfg.model:
            raise ValueError(f"{latest} was trained with model config {saved.model}, not {cfg.model}")
        step = ckpt.load_checkpoint(
            latest, models={"model": model}, optimizers={"optim": optimizer}, generators={"data": data_gen}
        )["step"]
    outputs = run_outputs(out, t, step, "pretrain", quiet)
    say = outputs.say
    ddp_model, rows = dist.wrap(model), dist.shard(t.batch_size)
    say(
        f"model: {model.num_params():,} parameters; {len(train_tokens):,} train / {len(val_tokens):,} val tokens"
        + (f"; resumed at step {step}" if step else "")
    )

    def micro_loss(_step: int, _i: int) -> torch.Tensor:
        x, y = random_batch(train_tokens.tokens, t.batch_size, T, data_gen)  # (B, T) each, the global batch
        with autocast_for(device, t.dtype):
            return ddp_model(x[rows].to(device), y[rows].to(device))[1]  # this rank's (B / N, T) share

    def save(at: int) -> None:
        dist.save_checkpoint(
            out,
            at,
            models={"model": model},
            optimizers={"optim": optimizer},
            generators={"data": data_gen},
            state={"config": to_dict(cfg)},
            record=lm_record(model),
            tokenizer=tokenizer,
            keep=t.keep_checkpoints,
        )

    train_step = offline_step(
        model=ddp_model,
        optimizer=optimizer,
        optim=cfg.optim,
        t=t,
        micro_loss=micro_loss,
        tokens_per_step=t.batch_size * T * t.grad_accum,
    )
    return run_loop(
        t=t,
        step=step,
        train_step=train_step,
        evaluate=lambda: {"val_loss": evaluate(model, val_tokens.tokens, t, T, device)},
        save=save,
        outputs=outputs,
        model=ddp_model,
        eval_interval=t.eval_interval,
    )
