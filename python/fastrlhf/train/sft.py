"""Step 1 of the recipe: supervised fine-tuning on demonstrations (InstructGPT, arXiv 2203.02155, 3.5).

    python -m fastrlhf sft --config configs/sft_arithmetic.toml [section.field=value ...]

Each example is `Prompt: {prompt}\\nResponse: {response}<|endoftext|>` (data.chat); the loss counts the
response tokens (and the EOT) only. Several examples are packed into one row of block_size tokens: each
gets its own segment id (no attention across examples) and positions that restart at 0, so a packed
row computes exactly what the examples would alone (tested). The optimisation loop, log, checkpoints and
resume are the ones pretraining uses (train.loop)."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastrlhf.config import to_dict
from fastrlhf.data import ByteBPETokenizer, Tokenizer, encode_chat, format_prompt, load_tokenizer
from fastrlhf.data.formats import SFTExample, read_sft
from fastrlhf.io import checkpoint as ckpt
from fastrlhf.models import GPT, IGNORE_INDEX, GPTConfig
from fastrlhf.models.families import TRAINING_BYTES, build_model
from fastrlhf.models.load import lm_record, load_model
from fastrlhf.models.lora import LoraConfig, add_lora
from fastrlhf.tasks.registry import load_task, task_names
from fastrlhf.train import dist
from fastrlhf.train.loop import (
    EpochStream,
    OfflineLoopConfig,
    offline_step,
    resolve_device,
    run_loop,
    run_outputs,
    shuffled,
)
from fastrlhf.train.optim import OptimConfig, autocast_for, make_adamw

Encoded = tuple[list[int], list[bool]]  # token ids of one example, True on the tokens the loss counts


@dataclass
class SFTDataConfig:
    """Where the demonstrations come from and what to do with those that do not fit."""

    source: str = "arithmetic"
    """A built-in task name (arithmetic, sentiment, tone) or an SFT JSONL file ({"prompt", "response"} lines)."""
    corpus: str = ""
    """sentiment only: a UTF-8 text file whose lines make the task; "" = Shakespeare (fetched once)."""
    val_file: str = ""
    """SFT JSONL of validation examples; "" = hold out val_fraction of the source (seeded)."""
    val_fraction: float = 0.05
    """Share of the source held out for the validation loss when val_file is empty."""
    overlong: str = "drop"
    """Examples longer than the context: 'drop' them, or 'truncate' the response (both are counted)."""

    def __post_init__(self) -> None:
        if self.overlong not in ("drop", "truncate"):
            raise ValueError(f"data.overlong must be 'drop' or 'truncate'; got {self.overlong!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1); got {self.val_fraction}")


@dataclass
class SFTTrainConfig(OfflineLoopConfig):
    """The loop: initial weights, batches of packed rows, evaluation, checkpoints."""

    out_dir: str = "runs/sft"
    """Checkpoints and log.jsonl go here; an existing run there is resumed."""
    init_from: str = ""
    """Where to start from: a pretrain (or any fastrlhf) checkpoint or run folder, a Hugging Face model folder, a
    GGUF file or 'smollm2-135m-instruct' (its model config and tokenizer are used, with its chat template);
    "" = random weights of [model] and a byte-level BPE of model.vocab_size trained on the examples."""
    max_steps: int = 300
    """Optimizer steps in the whole run."""
    batch_size: int = 8
    """Packed rows per micro-batch, over all processes (each of N torchrun ranks reads batch_size / N)."""
    block_size: int = 0
    """Tokens per packed row; 0 = the model's block_size."""
    eval_interval: int = 100
    """Validation loss every this many steps (and at the end)."""
    ckpt_interval: int = 100
    """Checkpoint every this many steps (and at the end); 0 = only at the end."""

    def __post_init__(self) -> None:
        self.check_at_least_one("max_steps", "batch_size", "eval_interval")


@dataclass
class SFTConfig:
    model: GPTConfig = field(default_factory=lambda: GPTConfig(vocab_size=512, block_size=64, n_embd=128))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=20))
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(r=0))
    """LoRA adapters on the initial model (lora.r > 0; models/lora.py): the base stays frozen, the checkpoints
    hold base + adapters, and the next stage loads the merged model."""


# --- data ----------------------------------------------------------------------------------------------


def load_demonstrations(source: str, corpus: str = "") -> list[SFTExample]:
    """The SFT examples of a built-in task or an SFT JSONL file."""
    if source in task_names():
        return load_task(source, corpus=corpus).demonstrations()
    if not Path(source).is_file():
        raise FileNotFoundError(
            f"data.source {source!r} is neither a task ({', '.join(task_names())}) nor a file"
        )
    return read_sft(source)


def encode_examples(
    tok: Tokenizer, examples: list[SFTExample], T: int, overlong: str
) -> tuple[list[Encoded], int, int]:
    """(encoded examples, dropped, truncated). An example longer than T is dropped, or with overlong =
    'truncate' cut to T tokens; one whose prompt leaves no response token inside T is always dropped."""
    out, dropped, truncated = [], 0, 0
    for ex in examples:
        ids, mask = encode_chat(tok, ex.prompt, ex.response)
        if len(ids) > T:
            # a target is a response token at index >= 1 inside the window
            if overlong == "drop" or not any(mask[1:T]):
                dropped += 1
                continue
            ids, mask = ids[:T], mask[:T]
            truncated += 1
        out.append((ids, mask))
    return out, dropped, truncated


def pack(examples: list[Encoded], T: int) -> list[list[Encoded]]:
    """Next-fit packing in the given order: a row takes examples while their total length is <= T."""
    rows: list[list[Encoded]] = []
    used = T + 1
    for ex in examples:
        if used + len(ex[0]) > T:
            rows.append([])
            used = 0
        rows[-1].append(ex)
        used += len(ex[0])
    return rows


def pack_batch(rows: list[list[Encoded]], T: int, pad_id: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """idx, targets, positions, segment_ids, each (B, T) int64, for packed rows. Example j of a row is
    segment j + 1 with positions 0..n-1; padding is segment 0. targets[t] is the token after t when that
    token is a response token of the same example, IGNORE_INDEX otherwise."""
    B = len(rows)
    idx = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    positions = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    segments = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    for b, row in enumerate(rows):
        o = 0
        for j, (ids, mask) in enumerate(row):
            n = len(ids)
            x, m = torch.tensor(ids), torch.tensor(mask)
            idx[b, o : o + n] = x
            targets[b, o : o + n - 1] = torch.where(m[1:], x[1:], IGNORE_INDEX)
            positions[b, o : o + n] = torch.arange(n)
            segments[b, o : o + n] = j + 1
            o += n
    return idx, targets, positions, segments


def token_losses(
    model: GPT, batch: tuple[Tensor, Tensor, Tensor, Tensor], device: torch.device
) -> tuple[Tensor, Tensor]:
    """(summed cross-entropy over the counted tokens, number of counted tokens) of one packed batch."""
    idx, targets, positions, segments = (x.to(device) for x in batch)
    logits = model(idx, positions=positions, segment_ids=segments)[0]  # (B, T, V)
    loss = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, (targets != IGNORE_INDEX).sum()


def split_validation(
    examples: list[SFTExample], fraction: float, seed: int
) -> tuple[list[SFTExample], list[SFTExample]]:
    """(train, val): a seeded share `fraction` (at least one example) held out."""
    if len(examples) < 2:
        raise ValueError(f"need at least 2 SFT examples to hold some out for validation; got {len(examples)}")
    order = list(range(len(examples)))
    random.Random(f"sft-val/{seed}").shuffle(order)
    n_val = max(1, int(len(examples) * fraction))
    val = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in val], [examples[i] for i in sorted(val)]


# --- training ------------------------------------------------------------------------------------------


def _setup(cfg: SFTConfig, out: Path, texts: list[str]) -> tuple[GPT, Tokenizer]:
    """The model (random, or from train.init_from) and the tokenizer (the checkpoint's or a new BPE)."""
    t = cfg.train
    if t.init_from:
        model, tok = load_model(t.init_from)
        if tok is None:
            raise ValueError(f"train.init_from {t.init_from} has no tokenizer")
        _apply_overrides(cfg, model)
        cfg.model = model.config  # the checkpoint decides the shape; recorded with the run
        torch.manual_seed(t.seed)  # dropout follows train.seed, as in a run from random weights
        return model.train(), tok
    latest = ckpt.latest_checkpoint(out)
    if latest is not None and (latest / "tokenizer").is_dir():
        tok = load_tokenizer(latest / "tokenizer")  # a resumed run keeps its tokenizer
    else:
        tok = dist.from_main(lambda: ByteBPETokenizer.train(texts, cfg.model.vocab_size))  # one for all ranks
    torch.manual_seed(t.seed)
    return build_model(cfg.model, TRAINING_BYTES), tok


def _apply_overrides(cfg: SFTConfig, model: nn.Module) -> None:
    """model.* fields set away from their defaults with train.init_from: dropout is applied to the loaded
    model; a shape field the checkpoint has otherwise is refused, named (the checkpoint decides the shape)."""
    default, saved = SFTConfig().model, model.config
    for f in dataclasses.fields(default):
        given = getattr(cfg.model, f.name)
        if given == getattr(default, f.name) or given == getattr(saved, f.name, None):
            continue
        if f.name != "dropout":
            raise ValueError(
                f"model.{f.name} = {given!r} cannot apply to train.init_from {cfg.train.init_from}: its model "
                f"has {f.name} = {getattr(saved, f.name, None)!r} (the checkpoint decides the shape); drop it"
            )
        saved.dropout = given
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = given


def sft(cfg: SFTConfig, quiet: bool = False) -> dict[str, float]:
    """Train (or resume) the SFT run cfg describes; returns the last train and val losses."""
    t, d = cfg.train, cfg.data
    device = resolve_device(t)
    out = Path(t.out_dir)
    examples = load_demonstrations(d.source, d.corpus)
    if d.val_file:
        train_ex, val_ex = examples, read_sft(d.val_file)
    else:
        train_ex, val_ex = split_validation(examples, d.val_fraction, t.seed)
    model, tok = _setup(cfg, out, [format_prompt(e.prompt) + " " + e.response for e in examples])
    if tok.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's ({tok.vocab_size})"
        )
    T = t.block_size or cfg.model.block_size
    if T > cfg.model.block_size:
        raise ValueError(f"train.block_size ({T}) must be <= model.block_size ({cfg.model.block_size})")
    train_enc, dropped, truncated = encode_examples(tok, train_ex, T, d.overlong)
    val_enc, val_dropped, _ = encode_examples(tok, val_ex, T, d.overlong)
    if not train_enc or not val_enc:
        raise ValueError(
            f"no SFT example fits the context of {T} tokens ({dropped} train and {val_dropped} "
            f"validation examples dropped as too long)"
        )
    dist.check_divides("train.batch_size", t.batch_size)
    if cfg.lora.r:
        add_lora(model, cfg.lora)  # seeded by train.seed, as every weight a run makes
    model = model.to(device)
    optimizer = make_adamw(model, cfg.optim)
    step = 0
    latest = ckpt.latest_checkpoint(out)
    if latest is not None:
        saved = ckpt.read_model_record(ckpt.read_state(latest), latest / ckpt.STATE_FILE)  # any family's
        if saved != lm_record(model):
            raise ValueError(f"{latest} was trained with model {saved}, not {lm_record(model)}")
        step = ckpt.load_checkpoint(latest, models={"model": model}, optimizers={"optim": optimizer})["step"]

    stream = EpochStream(lambda e: pack(shuffled(train_enc, t.seed, e), T))
    val_rows = pack(val_enc, T)
    outputs = run_outputs(out, t, step, "sft", quiet)
    logger, say = outputs.logger, outputs.say
    ddp_model, share, world = dist.wrap(model), dist.shard(t.batch_size), dist.world_size()
    if not step:
        logger.log(
            step=0,
            train_examples=len(train_enc),
            val_examples=len(val_enc),
            dropped=dropped,
            truncated=truncated,
            val_dropped=val_dropped,
        )
    say(
        f"model: {model.num_params():,} parameters; {len(train_enc)} train / {len(val_enc)} val examples; "
        f"{dropped} dropped and {truncated} truncated (longer than {T} tokens, data.overlong={d.overlong})"
        + (f"; resumed at step {step}" if step else "")
    )
    counted = [0]

    def micro_loss(s: int, i: int) -> Tensor:
        rows = stream.take((s * t.grad_accum + i) * t.batch_size, t.batch_size)[share]
        with autocast_for(device, t.dtype):
            total, n = token_losses(ddp_model, pack_batch(rows, T, tok.eot_id), device)
        read = sum(len(ids) for row in rows for ids, _ in row)  # every token the model reads (tok/s)
        if world == 1:
            counted[0] += read
            return total / n.clamp(min=1)
        # the global batch's token mean: DDP averages over the N ranks, so each gives N * its sum / all tokens
        both = dist.all_sum(
            torch.stack([n.to(torch.float64).cpu(), torch.tensor(float(read), dtype=torch.float64)])
        )
        counted[0] += int(both[1])
        return total * world / both[0].to(total.device).clamp(min=1)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        model.eval()
        total, n = 0.0, 0
        for k, i in enumerate(range(0, len(val_rows), t.batch_size)):
            if k % world != dist.rank():  # rank r scores chunks r, r + N, ...
                continue
            with autocast_for(device, t.dtype):
                s, c = token_losses(model, pack_batch(val_rows[i : i + t.batch_size], T, tok.eot_id), device)
            total, n = total + s.item(), n + int(c)
        total, n = dist.all_sum(torch.tensor([total, n], dtype=torch.float64)).tolist()
        return {"val_loss": total / n}

    def tokens_per_step() -> int:
        n, counted[0] = counted[0], 0
        return n

    def save(at: int) -> None:
        dist.save_checkpoint(
            out,
            at,
            models={"model": model},
            optimizers={"optim": optimizer},
            state={"config": to_dict(cfg)},
            record=lm_record(model),
            tokenizer=tok,
            keep=t.keep_checkpoints,
        )

    train_step = offline_step(
        model=ddp_model,
        optimizer=optimizer,
        optim=cfg.optim,
        t=t,
        micro_loss=micro_loss,
        tokens_per_step=tokens_per_step,
    )
    return run_loop(
        t=t,
        step=step,
        train_step=train_step,
        evaluate=evaluate,
        save=save,
        outputs=outputs,
        model=ddp_model,
        eval_interval=t.eval_interval,
    )
