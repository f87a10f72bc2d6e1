"""Direct preference optimisation from K-wise rankings (Rafailov et al. 2023, arXiv 2305.18290), with the IPO
loss (Azar et al. 2023, arXiv 2310.12036) and the listwise Plackett-Luce loss (DPO's appendix A.3).

    python -m fastrlhf dpo --config configs/dpo_sentiment.toml [section.field=value ...]

The data is what the label stage writes (K answers to a prompt, ranked; pair files with chosen/rejected are
K = 2). One ranking is one batch element, as in the reward model: its K answers take K policy forwards with
the prompt computed once (train.preference.sequence_logprobs), and every loss reads only each answer's
log-ratio r = log pi(y | x) - log pi_ref(y | x), so all C(K, 2) pairs cost K forwards, not 2 C(K, 2).

The reference is the initial policy. Its log-likelihoods are computed once, before step 1, for every
training and held-out answer, and written to out_dir/reference_logps.json: a resumed run reads them back
(bit-exact, without loading the initial weights again; a run folder that lost the file recomputes them from
`policy`, the same numbers), and no second model is held in memory while training. The
policy trains with dropout off (as TRL's disable_dropout): at step 0 the log-ratios are 0 up to rounding.
The loop, log, checkpoints, lock and kill -9 resume are the offline trainers' (train.loop)."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from fastrlhf.config import check_choice, check_range, from_dict, to_dict
from fastrlhf.data import Tokenizer, encode_chat
from fastrlhf.data.formats import Ranking, numbered_rankings
from fastrlhf.io import checkpoint as ckpt
from fastrlhf.io.files import atomic_write_text
from fastrlhf.io.lock import RunLock
from fastrlhf.models.load import from_pretrained, lm_record, load_pretrained_tokenizer
from fastrlhf.models.lora import LoraConfig, adapters_off, add_lora
from fastrlhf.models.transformer import CausalLM
from fastrlhf.train import dist
from fastrlhf.train.loop import (
    EpochStream,
    OfflineLoopConfig,
    StepResult,
    offline_step,
    resolve_device,
    run_loop,
    run_outputs,
    shuffled,
)
from fastrlhf.train.optim import OptimConfig, autocast_for, make_adamw
from fastrlhf.train.preference import (
    LOSSES,
    Encoded,
    means,
    pair_sums,
    preference_loss,
    ranking_batch,
    sequence_logprobs,
)
from fastrlhf.train.reward import split_by_prompt

REFERENCE_FILE = "reference_logps.json"


@dataclass
class DPOSettings:
    """[dpo]: the loss."""

    beta: float = 0.1
    """The KL penalty's strength: rewards are beta * log-ratios (DPO eq. 7; IPO's tau)."""
    loss: str = "sigmoid"
    """'sigmoid' (DPO) or 'ipo', each a mean over a ranking's pairs (tied answers form none), or
    'plackett_luce' (listwise: -log P(ranking), ties kept in the file's order)."""

    def __post_init__(self) -> None:
        check_range("dpo.beta", self.beta, 0.0, float("inf"), lo_open=True, hi_open=True)
        check_choice("dpo.loss", self.loss, LOSSES)


@dataclass
class DPODataConfig:
    """Rankings to train on and to measure held-out accuracy on."""

    train: str = "runs/sentiment/label/train.jsonl"
    """Rankings JSONL ({"prompt", "responses", "ranking"[, "scores"]} or {"prompt", "chosen", "rejected"})."""
    val: str = ""
    """Rankings JSONL for the held-out metrics; "" = hold out val_fraction of the prompts of `train`."""
    val_fraction: float = 0.1
    """Share of the prompts held out when val is empty (all rankings of a prompt stay on one side)."""
    overlong: str = "error"
    """A prompt + answer longer than the policy's block_size: 'error' (names the file and line) or
    'truncate' (the answer is cut; counted in the log)."""

    def __post_init__(self) -> None:
        check_choice("data.overlong", self.overlong, ("error", "truncate"))
        check_range("data.val_fraction", self.val_fraction, 0.0, 1.0, lo_open=True, hi_open=True)


@dataclass
class DPOTrainConfig(OfflineLoopConfig):
    """The loop: batches of rankings, evaluation, checkpoints."""

    out_dir: str = "runs/dpo"
    """Checkpoints, log.jsonl and reference_logps.json go here; an existing run there is resumed."""
    max_steps: int = 200
    """Optimizer steps in the whole run."""
    batch_size: int = 8
    """Rankings per micro-batch (each K answers), over all processes (N torchrun ranks read batch_size / N)."""
    eval_interval: int = 50
    """Held-out metrics every this many steps (and at the end)."""
    ckpt_interval: int = 100
    """Checkpoint every this many steps (and at the end); 0 = only at the end."""

    def __post_init__(self) -> None:
        self.check_at_least_one("max_steps", "batch_size", "eval_interval")


@dataclass
class DPOConfig:
    policy: str = "runs/sentiment/sft"
    """The initial policy and reference: a run folder, an HF folder, a .gguf file or a model name."""
    dpo: DPOSettings = field(default_factory=DPOSettings)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-5, min_lr=1e-6, warmup_steps=10, weight_decay=0.0)
    )
    data: DPODataConfig = field(default_factory=DPODataConfig)
    train: DPOTrainConfig = field(default_factory=DPOTrainConfig)
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(r=0))
    """LoRA adapters on the policy (lora.r > 0): its base frozen; the reference is that base (the adapters
    start at zero, so the reference log-probs are the initial policy's as for full fine-tuning)."""


# --- data --------------------------------------------------------------------------------------------------


def encode_rankings(
    tok: Tokenizer, rows: list[tuple[int, Ranking]], where: str, T: int, overlong: str
) -> tuple[list[Encoded], int]:
    """(encoded rankings, answers truncated) of (line number, ranking) rows read from file `where`. An
    answer that does not fit T tokens is an error naming the line, or with overlong = 'truncate' is cut
    (its prompt must leave at least one answer token)."""
    out, truncated = [], 0
    for lineno, r in rows:
        seqs, lens = [], []
        for k, answer in enumerate(r.responses):
            ids, mask = encode_chat(tok, r.prompt, answer)
            n = sum(mask)
            if len(ids) > T:
                if overlong == "error" or len(ids) - n >= T:
                    raise ValueError(
                        f"{where}:{lineno}: prompt + answer {k} is {len(ids)} tokens ({len(ids) - n} of "
                        f"them the prompt), more than the policy's block_size {T}"
                        + ("; set data.overlong = 'truncate' to cut the answers" if len(ids) - n < T else "")
                    )
                ids, n, truncated = ids[:T], n - (len(ids) - T), truncated + 1
            seqs.append(ids)
            lens.append(n)
        out.append(Encoded(seqs, lens, r.pairs(), r.ranking))
    return out, truncated


@torch.no_grad()
def reference_logps(
    model: CausalLM,
    data: list[Encoded],
    pad_id: int,
    device: torch.device,
    batch_size: int,
    dtype: str,
    progress: bool = False,
) -> list[list[float]]:
    """log pi_ref(y | x) of every answer of every ranking, computed batch_size rankings at a time (a LoRA
    model's adapters switched off: its base is the reference)."""
    out: list[list[float]] = []
    bar = tqdm(
        range(0, len(data), batch_size),
        desc="reference log-probs",
        unit="batch",
        disable=not (progress and sys.stderr.isatty()),
        file=sys.stderr,
    )
    for i in bar:
        b = ranking_batch(data[i : i + batch_size], pad_id).to(device)
        with autocast_for(device, dtype), adapters_off(model):
            lp = sequence_logprobs(model, b.layout, b.answer_len).float().cpu().tolist()  # (N,)
        for e in data[i : i + batch_size]:
            out.append(lp[: len(e.seqs)])
            lp = lp[len(e.seqs) :]
    return out


def cached_reference(path: Path, key: str, make: Callable[[], list[list[float]]]) -> tuple[list, bool]:
    """(the reference log-probs per ranking, read from file?): path's when a run with the same key (policy,
    token ids, dtype) wrote it, else make()'s, written there atomically. Floats go through JSON exactly.
    Under torchrun rank 0 reads or computes, and every rank gets its numbers."""

    def read_or_make() -> tuple[list, bool]:
        if not path.is_file():
            return make(), False
        saved = json.loads(path.read_text())
        if saved["key"] != key:
            raise ValueError(
                f"{path} holds the reference log-probs of another policy, other rankings or another dtype "
                "than this run's config gives; resume with the settings it started with, or use a new out_dir"
            )
        return saved["logps"], True

    values, read = dist.from_main(read_or_make)
    if not read and dist.is_main():
        atomic_write_text(path, json.dumps({"key": key, "logps": values}))
    return values, read


def load_split(cfg: DPOConfig, tok: Tokenizer, T: int) -> tuple[list[Encoded], list[Encoded], dict[str, int]]:
    """(train, held-out) encoded rankings with the all-tied ones left out (they state no preference), and
    the counts the first log row records."""
    d = cfg.data
    rows = list(numbered_rankings(d.train))
    if d.val:
        train_rows, val_rows, val_where = rows, list(numbered_rankings(d.val)), d.val
    else:
        held = {r.prompt for r in split_by_prompt([r for _, r in rows], d.val_fraction, cfg.train.seed)[1]}
        train_rows = [x for x in rows if x[1].prompt not in held]
        val_rows, val_where = [x for x in rows if x[1].prompt in held], d.train
    tied = sum(not r.pairs() for _, r in train_rows), sum(not r.pairs() for _, r in val_rows)
    train, cut = encode_rankings(tok, [x for x in train_rows if x[1].pairs()], d.train, T, d.overlong)
    val, val_cut = encode_rankings(tok, [x for x in val_rows if x[1].pairs()], val_where, T, d.overlong)
    if not train or not val:
        raise ValueError(
            f"no {'training' if not train else 'held-out'} ranking states a preference "
            f"({tied[0]} train and {tied[1]} held-out rankings are all tied)"
        )
    counts = dict(
        train_rankings=len(train),
        val_rankings=len(val),
        all_tied=tied[0],
        val_all_tied=tied[1],
        truncated=cut,
        val_truncated=val_cut,
        train_pairs=sum(len(e.pairs) for e in train),
        val_pairs=sum(len(e.pairs) for e in val),
    )
    return train, val, counts


# --- training ----------------------------------------------------------------------------------------------


def dpo(cfg: DPOConfig, quiet: bool = False) -> dict[str, float]:
    """Train (or resume) the DPO run cfg describes; returns the last step's and held-out metrics."""
    t, s = cfg.train, cfg.dpo
    device = resolve_device(t)
    out = Path(t.out_dir)
    latest = ckpt.latest_checkpoint(out)
    # a full fine-tuning resume needs no initial weights; a LoRA one rebuilds its adapters on them
    source = latest if latest is not None and not cfg.lora.r else cfg.policy
    if not source:
        raise ValueError("policy is empty: give a run folder, an HF folder, a .gguf file or a model name")
    model, tok = from_pretrained(source), load_pretrained_tokenizer(source)
    T = model.config.block_size
    train_enc, val_enc, counts = load_split(cfg, tok, T)
    dist.check_divides("train.batch_size", t.batch_size)
    if cfg.lora.r:
        torch.manual_seed(t.seed)  # the adapters' initial A, as every weight a run makes
        add_lora(model, cfg.lora)
    model = model.to(device).eval()  # dropout off: the policy starts equal to the reference
    optimizer = make_adamw(model, cfg.optim)
    step = 0
    if latest is not None:
        saved = from_dict(DPOConfig, ckpt.read_state(latest)["state"]["config"])
        if saved.policy != cfg.policy or saved.lora != cfg.lora:
            raise ValueError(
                f"{latest} was trained from policy {saved.policy!r} with {saved.lora}, not {cfg.policy!r} with "
                f"{cfg.lora}"
            )
        step = ckpt.load_checkpoint(latest, models={"model": model}, optimizers={"optim": optimizer})["step"]

    t0 = time.perf_counter()
    key = hashlib.sha256(
        json.dumps([cfg.policy, t.dtype, [[e.seqs, e.answer_len] for e in train_enc + val_enc]]).encode()
    ).hexdigest()
    with RunLock(out) if dist.is_main() else nullcontext():  # run_outputs holds it for the rest of the run
        refs, was_cached = cached_reference(
            out / REFERENCE_FILE,
            key,
            lambda: reference_logps(
                # the initial weights: the policy itself before step 1, a LoRA policy's base on a resume
                model if latest is None or cfg.lora.r else from_pretrained(cfg.policy).to(device),
                train_enc + val_enc,
                tok.eot_id,
                device,
                t.batch_size,
                t.dtype,
                progress=not quiet,
            ),
        )
    for e, r in zip(train_enc + val_enc, refs):
        e.ref = torch.tensor(r, dtype=torch.float32)

    stream = EpochStream(lambda ep: shuffled(train_enc, t.seed, ep))
    outputs = run_outputs(out, t, step, "dpo", quiet)
    say = outputs.say
    if not step:
        outputs.logger.log(step=0, **counts)
    say(
        f"policy: {model.num_params():,} parameters from {source}; {counts['train_rankings']} train / "
        f"{counts['val_rankings']} held-out rankings ({counts['train_pairs']} / {counts['val_pairs']} pairs); "
        f"{counts['all_tied'] + counts['val_all_tied']} all tied, left out; "
        f"{counts['truncated'] + counts['val_truncated']} answers truncated to {T} tokens; reference "
        f"log-probs {'read from' if was_cached else 'computed'} ({time.perf_counter() - t0:.1f} s) "
        f"{out / REFERENCE_FILE}" + (f"; resumed at step {step}" if step else "")
    )
    call, share = dist.wrap_call(model), dist.shard(t.batch_size)
    sums: list[Tensor] = []
    seen = [0]

    def micro_loss(st: int, i: int) -> Tensor:
        batch = stream.take((st * t.grad_accum + i) * t.batch_size, t.batch_size)
        seen[0] += sum(len(x) for e in batch for x in e.seqs)  # tokens of the global batch
        b = ranking_batch(batch[share], tok.eot_id).to(device)  # whole rankings per rank
        with autocast_for(device, t.dtype):
            logratios = call(sequence_logprobs, model, b.layout, b.answer_len).float() - b.ref  # (N,)
        sums.append(pair_sums(logratios, b, s.beta))
        return preference_loss(logratios, b, s.beta, s.loss)

    def tokens_per_step() -> int:
        n, seen[0] = seen[0], 0
        return n

    update = offline_step(
        model=model,
        optimizer=optimizer,
        optim=cfg.optim,
        t=t,
        micro_loss=micro_loss,
        tokens_per_step=tokens_per_step,
    )

    def train_step(st: int) -> StepResult:
        result = update(st)
        stats = means(torch.stack(sums).sum(0))
        sums.clear()
        result.metrics.update(stats)
        result.show.update(acc=stats["accuracy"], margin=stats["reward_margin"])
        return result

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        total, loss = torch.zeros(6, dtype=torch.float64, device=device), 0.0
        for c, i in enumerate(range(0, len(val_enc), t.batch_size)):
            if c % dist.world_size() != dist.rank():  # rank r scores chunks r, r + N, ...
                continue
            b = ranking_batch(val_enc[i : i + t.batch_size], tok.eot_id).to(device)
            with autocast_for(device, t.dtype):
                logratios = sequence_logprobs(model, b.layout, b.answer_len).float() - b.ref
            total += pair_sums(logratios, b, s.beta)
            loss += preference_loss(logratios, b, s.beta, s.loss).item() * (b.order.shape[0])
        val_loss = float(dist.all_sum(torch.tensor(loss, dtype=torch.float64))) / len(val_enc)
        return {"val_loss": val_loss, **means(total, "val_")}

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

    return run_loop(
        t=t,
        step=step,
        train_step=train_step,
        evaluate=evaluate,
        save=save,
        outputs=outputs,
        eval_interval=t.eval_interval,
    )
