"""Step 2 of the recipe: a reward model trained on K-wise rankings (InstructGPT, arXiv 2203.02155, 3.5).

    python -m fastrlhf rm --config configs/rm_arithmetic.toml [section.field=value ...]

The trunk starts from the SFT checkpoint, a scalar head reads the last response token (the EOT of the
chat format). One ranking is one batch element: its K responses are scored in K forward passes and the
loss is -log sigmoid(r_better - r_worse - margin) averaged over all C(K, 2) pairs it implies, then over
rankings. Flattening rankings into independent pairs (train.pairwise, the common practice) scores each
response K - 1 times: 2 * C(K, 2) passes instead of K. Whenever a checkpoint is written, the head's bias
is shifted so that the SFT demonstrations score 0 on average (the loss only sees differences, so the
shift changes no gradient)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastrlhf.config import from_dict, to_dict
from fastrlhf.data import Tokenizer, encode_chat, encode_prompt
from fastrlhf.data.formats import Ranking, read_rankings
from fastrlhf.io import checkpoint as ckpt
from fastrlhf.io.checkpoint import read_model_record
from fastrlhf.models import ScalarHeadModel
from fastrlhf.models.load import is_pretrained_source, load_model, load_scalar_model, scalar_record
from fastrlhf.models.lora import LoraConfig, add_lora
from fastrlhf.models.shared import shared_layout
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
from fastrlhf.train.sft import load_demonstrations

# one ranking, encoded: token ids of each response's prompt + response + EOT, and its (better, worse) pairs
EncodedRanking = tuple[list[list[int]], list[tuple[int, int]]]


@dataclass
class RMDataConfig:
    """Rankings to train and validate on, and the demonstrations that set the reward's zero."""

    train: str = "runs/rankings_train.jsonl"
    """Rankings JSONL ({"prompt", "responses", "ranking"} or {"prompt", "chosen", "rejected"} lines)."""
    val: str = ""
    """Rankings JSONL for the held-out metrics; "" = hold out val_fraction of the prompts of `train`."""
    val_fraction: float = 0.1
    """Share of the prompts held out when val is empty (all rankings of a prompt stay on one side)."""
    demos: str = ""
    """Task name or SFT JSONL whose demonstrations should score 0; "" = the SFT run's data.source ("none" for a pretrained source); "none" = keep the bias."""
    max_demos: int = 512
    """At most this many demonstrations (the first ones) are scored for the bias."""
    overlong: str = "drop"
    """Rankings with a response longer than the context: 'drop' the ranking, or 'truncate' the response."""

    def __post_init__(self) -> None:
        if self.overlong not in ("drop", "truncate"):
            raise ValueError(f"data.overlong must be 'drop' or 'truncate'; got {self.overlong!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1); got {self.val_fraction}")


@dataclass
class RMTrainConfig(OfflineLoopConfig):
    """The loop: where the trunk comes from, batches of rankings, evaluation, checkpoints."""

    sft: str = "runs/sft"
    """SFT checkpoint or run folder, or a pretrained source (HF folder, GGUF file, 'smollm2-135m-instruct'):
    the trunk's initial weights and the tokenizer."""
    out_dir: str = "runs/rm"
    """Checkpoints and log.jsonl go here; an existing run there is resumed."""
    max_steps: int = 200
    """Optimizer steps in the whole run."""
    batch_size: int = 8
    """Rankings per micro-batch (each contributes K sequences), over all processes (N torchrun ranks
    read batch_size / N whole rankings each)."""
    margin: float = 0.0
    """Required reward gap: the pair loss is -log sigmoid(r_better - r_worse - margin)."""
    center_coef: float = 0.0
    """Weight of mean(r^2) over the batch's responses, added to the ranking loss (Eisenstein et al. 2023,
    arXiv 2312.09244; TRL's center_rewards_coefficient). The ranking loss leaves each prompt's reward
    offset free, and PPO's critic then has to learn those offsets; 0 = off."""
    pairwise: bool = False
    """Flatten each ranking into C(K, 2) independent pairs (the usual practice; for comparison)."""
    share_prefix: bool = True
    """Run each ranking's prompt once and the last block at the read token only (same rewards and
    gradients as the plain forward, fewer FLOPs); false = one plain forward per response."""
    eval_interval: int = 50
    """Held-out metrics every this many steps (and at the end)."""
    ckpt_interval: int = 100
    """Checkpoint every this many steps (and at the end); 0 = only at the end."""

    def __post_init__(self) -> None:
        self.check_at_least_one("max_steps", "batch_size", "eval_interval")
        for name in ("margin", "center_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0; got {getattr(self, name)}")


@dataclass
class RMConfig:
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=3e-4, min_lr=3e-5, warmup_steps=10, weight_decay=0.0)
    )
    data: RMDataConfig = field(default_factory=RMDataConfig)
    train: RMTrainConfig = field(default_factory=RMTrainConfig)
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(r=0))
    """LoRA adapters on the reward model's trunk (lora.r > 0; models/lora.py): the trunk frozen, the adapters
    and the scalar head trained. The checkpoint keeps them apart; load_reward_model merges them (or keeps
    them, to share the trunk's base weights with a policy that has the same base, rl/build.py)."""


# --- data and loss -------------------------------------------------------------------------------------


def encode_rankings(
    tok: Tokenizer, rankings: list[Ranking], T: int, overlong: str
) -> tuple[list[EncodedRanking], int, int]:
    """(encoded rankings, dropped, truncated responses): each response as prompt + response + EOT ids."""
    out, dropped, truncated = [], 0, 0
    for r in rankings:
        seqs, cut = [encode_chat(tok, r.prompt, resp)[0] for resp in r.responses], 0
        if any(len(s) > T for s in seqs):
            # with the prompt alone filling the context there is no response token left to score
            if overlong == "drop" or len(encode_prompt(tok, r.prompt)) >= T:
                dropped += 1
                continue
            cut = sum(len(s) > T for s in seqs)
            seqs = [s[:T] for s in seqs]
        truncated += cut
        out.append((seqs, r.pairs()))
    return out, dropped, truncated


def as_pairs(encoded: list[EncodedRanking]) -> list[EncodedRanking]:
    """Every (better, worse) pair of every ranking as its own K = 2 ranking (independent pairs)."""
    return [([seqs[b], seqs[w]], [(0, 1)]) for seqs, pairs in encoded for b, w in pairs]


def ranking_batch(batch: list[EncodedRanking], pad_id: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """idx (N, T) right-padded sequences of all N = sum(K) responses, last (N,) index of each one's last
    token, better/worse (P,) indices into N of all pairs, owner (P,) the ranking each pair belongs to.
    Right padding needs no mask: causal attention never lets a real token see the pads after it."""
    seqs = [s for ranking, _ in batch for s in ranking]
    T = max(map(len, seqs))
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # (N, T)
    for n, s in enumerate(seqs):
        idx[n, : len(s)] = torch.tensor(s)
    last = torch.tensor([len(s) - 1 for s in seqs])  # (N,)
    better, worse, owner, base = [], [], [], 0
    for i, (ranking, pairs) in enumerate(batch):
        better += [base + b for b, _ in pairs]
        worse += [base + w for _, w in pairs]
        owner += [i] * len(pairs)
        base += len(ranking)
    return idx, last, torch.tensor(better), torch.tensor(worse), torch.tensor(owner)


def kwise_loss(rewards: Tensor, better: Tensor, worse: Tensor, owner: Tensor, margin: float = 0.0) -> Tensor:
    """Mean over rankings of the mean over each ranking's pairs of -log sigmoid(r_b - r_w - margin).
    rewards (N,); better, worse, owner (P,). InstructGPT's eq. 1 with 1 / C(K, 2) per ranking."""
    pair_loss = -F.logsigmoid(rewards[better] - rewards[worse] - margin)  # (P,)
    n = int(owner.max()) + 1
    total = torch.zeros(n, dtype=pair_loss.dtype, device=pair_loss.device).index_add(
        0, owner, pair_loss
    )  # (n,)
    count = torch.zeros(n, dtype=pair_loss.dtype, device=pair_loss.device).index_add(
        0, owner, torch.ones_like(pair_loss)
    )
    return (total / count).mean()


def score_batch(
    rm: ScalarHeadModel | nn.Module,
    batch: list[EncodedRanking],
    pad_id: int,
    device: torch.device,
    share: bool = True,
) -> tuple[Tensor, ...]:
    """rewards (N,) of every response in the batch, and its better/worse/owner pair indices (P,).
    share: each ranking's common prefix (its prompt) runs once and the last block runs at the read token
    only (model.shared; the same rewards and gradients as the plain forward, fewer FLOPs); False = one
    plain forward over all N right-padded sequences. rm may be the DDP wrapper of a ScalarHeadModel: its
    forward (not .score) is what syncs gradients."""
    idx, last, better, worse, owner = ranking_batch(batch, pad_id)
    if share:
        layout = shared_layout(
            [s for ranking, _ in batch for s in ranking], [len(r) for r, _ in batch], pad_id
        )
        rewards = rm(shared=layout.to(device))  # (N,)
    else:
        values = rm(idx.to(device))  # (N, T)
        rewards = values.gather(1, last.to(device)[:, None]).squeeze(1)  # (N,) at each last token
    if rewards.dtype != torch.float64:
        rewards = rewards.float()  # the loss in fp32 under bf16/fp16 autocast
    return rewards, better.to(device), worse.to(device), owner.to(device)


@torch.no_grad()
def rm_metrics(
    rm: ScalarHeadModel,
    data: list[EncodedRanking],
    pad_id: int,
    device: torch.device,
    batch_size: int,
    margin: float = 0.0,
    share: bool = True,
) -> dict[str, float]:
    """Held-out val_loss, pairwise accuracy (r_better > r_worse), mean margin (r_better - r_worse over
    pairs) and accuracy per K (acc_k<K>). Under torchrun rank r scores chunks r, r + N, ... and every
    rank gets all the pairs' margins."""
    was = rm.training
    rm.eval()
    diffs, ks, losses = [], [], []
    for c, i in enumerate(range(0, len(data), batch_size)):
        if c % dist.world_size() != dist.rank():
            continue
        chunk = data[i : i + batch_size]
        rewards, better, worse, owner = score_batch(rm, chunk, pad_id, device, share)
        losses.append(kwise_loss(rewards, better, worse, owner, margin).item() * len(chunk))
        diffs.append((rewards[better] - rewards[worse]).cpu())
        ks.append(torch.tensor([len(chunk[j][0]) for j in owner.tolist()]))
    rm.train(was)
    diff, k = dist.gather_cat(diffs), dist.gather_cat(ks)  # (P,) each: every pair of every rank
    loss = float(dist.all_sum(torch.tensor(sum(losses), dtype=torch.float64)))
    out = {
        "val_loss": loss / len(data),
        "val_accuracy": (diff > 0).float().mean().item(),
        "val_margin": diff.mean().item(),
    }
    for kk in sorted(set(k.tolist())):
        out[f"val_acc_k{kk}"] = (diff[k == kk] > 0).float().mean().item()
    return out


@torch.no_grad()
def normalize_bias(
    rm: ScalarHeadModel, tok: Tokenizer, demos: list, device: torch.device, batch_size: int = 32
) -> float:
    """Shift the head's bias so the demonstrations' mean reward is 0; returns the mean before the shift."""
    T = rm.config.block_size
    seqs = [ids for ids in (encode_chat(tok, d.prompt, d.response)[0] for d in demos) if len(ids) <= T]
    if not seqs:
        raise ValueError(f"no demonstration fits the context of {T} tokens to normalise the reward with")
    was = rm.training
    rm.eval()
    total = 0.0
    for c, i in enumerate(range(0, len(seqs), batch_size)):
        if c % dist.world_size() != dist.rank():  # rank r scores chunks r, r + N, ...
            continue
        chunk = [([s], []) for s in seqs[i : i + batch_size]]
        idx, last, *_ = ranking_batch(chunk, tok.eot_id)
        total += rm.score(idx.to(device), last.to(device)).sum().item()
    rm.train(was)
    mean = float(dist.all_sum(torch.tensor(total, dtype=torch.float64))) / len(
        seqs
    )  # every rank shifts alike
    rm.head.bias -= mean
    return mean


def split_by_prompt(
    rankings: list[Ranking], fraction: float, seed: int
) -> tuple[list[Ranking], list[Ranking]]:
    prompts = sorted({r.prompt for r in rankings})
    random.Random(f"rm-val/{seed}").shuffle(prompts)
    held = set(prompts[: max(1, int(len(prompts) * fraction))])
    if len(held) == len(prompts):
        raise ValueError(f"need rankings of at least 2 prompts to hold some out; got {len(prompts)}")
    return [r for r in rankings if r.prompt not in held], [r for r in rankings if r.prompt in held]


# --- training ------------------------------------------------------------------------------------------


def load_reward_model(path: str | Path) -> tuple[ScalarHeadModel, Tokenizer | None]:
    """(reward model, tokenizer) from a checkpoint or run folder written by `python -m fastrlhf rm`."""
    return load_scalar_model(path)


def train_rm(cfg: RMConfig, quiet: bool = False) -> dict[str, float]:
    """Train (or resume) the reward model cfg describes; returns the last loss and held-out metrics."""
    t, d = cfg.train, cfg.data
    device = resolve_device(t)
    out = Path(t.out_dir)
    gpt, tok = load_model(t.sft)
    if tok is None:
        raise ValueError(f"train.sft {t.sft} has no tokenizer")
    sft_ckpt = None if is_pretrained_source(t.sft) else ckpt.resolve_checkpoint(t.sft)
    T = gpt.config.block_size
    rankings = read_rankings(d.train)
    train_r, val_r = (
        (rankings, read_rankings(d.val)) if d.val else split_by_prompt(rankings, d.val_fraction, t.seed)
    )
    # a ranking whose responses all tie (equal labeler scores) states no preference: nothing to learn or test
    tied = sum(not r.pairs() for r in train_r), sum(not r.pairs() for r in val_r)
    train_r, val_r = [r for r in train_r if r.pairs()], [r for r in val_r if r.pairs()]
    train_enc, dropped, truncated = encode_rankings(tok, train_r, T, d.overlong)
    val_enc, val_dropped, _ = encode_rankings(tok, val_r, T, d.overlong)
    if not train_enc or not val_enc:
        raise ValueError(
            f"no ranking fits the context of {T} tokens or states a preference ({dropped} train and "
            f"{val_dropped} validation rankings dropped as too long, {sum(tied)} all tied)"
        )
    demos_from, corpus = (d.demos, "") if d.demos or sft_ckpt is None else sft_source(sft_ckpt)
    demos_from = demos_from or "none"  # a pretrained source (HF, GGUF) records no SFT data
    demos = [] if demos_from == "none" else load_demonstrations(demos_from, corpus)[: d.max_demos]

    dist.check_divides("train.batch_size", t.batch_size)
    torch.manual_seed(t.seed)
    rm = ScalarHeadModel.from_gpt(gpt)
    if cfg.lora.r:
        add_lora(rm.trunk, cfg.lora)  # the trunk frozen; the head stays trainable
    rm = rm.to(device)
    optimizer = make_adamw(rm, cfg.optim)
    step = 0
    latest = ckpt.latest_checkpoint(out)
    if latest is not None:
        saved = read_model_record(ckpt.read_state(latest), latest)
        if saved != scalar_record(rm):
            raise ValueError(f"{latest} was trained with model {saved}, not {scalar_record(rm)}")
        step = ckpt.load_checkpoint(latest, models={"model": rm}, optimizers={"optim": optimizer})["step"]

    batches = EpochStream(lambda e: shuffled(as_pairs(train_enc) if t.pairwise else train_enc, t.seed, e))
    outputs = run_outputs(out, t, step, "rm", quiet)
    logger, say = outputs.logger, outputs.say
    ddp_rm, share = dist.wrap(rm), dist.shard(t.batch_size)
    if not step:
        logger.log(
            step=0,
            train_rankings=len(train_enc),
            val_rankings=len(val_enc),
            dropped=dropped,
            truncated=truncated,
            val_dropped=val_dropped,
            all_tied=tied[0],
            val_all_tied=tied[1],
            train_pairs=sum(len(p) for _, p in train_enc),
            val_pairs=sum(len(p) for _, p in val_enc),
            demos=len(demos),
        )
    say(
        f"reward model: {rm.trunk.num_params():,} trunk parameters from {sft_ckpt}; {len(train_enc)} train / "
        f"{len(val_enc)} held-out rankings; {dropped} dropped, {truncated} responses truncated, "
        f"{sum(tied)} all tied" + (f"; resumed at step {step}" if step else "")
    )
    seen = [0]

    def micro_loss(s: int, i: int) -> Tensor:
        batch = batches.take((s * t.grad_accum + i) * t.batch_size, t.batch_size)
        seen[0] += sum(len(x) for r, _ in batch for x in r)  # tokens of the global batch
        with autocast_for(
            device, t.dtype
        ):  # whole rankings per rank: the mean of the ranks' means is the mean
            rewards, better, worse, owner = score_batch(
                ddp_rm, batch[share], tok.eot_id, device, t.share_prefix
            )
        return kwise_loss(rewards, better, worse, owner, t.margin) + t.center_coef * rewards.square().mean()

    def tokens_per_step() -> int:
        n, seen[0] = seen[0], 0
        return n

    def save(at: int) -> None:
        if demos:
            mean = normalize_bias(rm, tok, demos, device)
            logger.log(step=at, demo_reward_before_shift=mean)
        dist.save_checkpoint(
            out,
            at,
            models={"model": rm},
            optimizers={"optim": optimizer},
            tokenizer=tok,
            state={"config": to_dict(cfg), "sft": str(sft_ckpt)},
            record=scalar_record(rm),
            keep=t.keep_checkpoints,
        )

    train_step = offline_step(
        model=ddp_rm,
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
        evaluate=lambda: rm_metrics(rm, val_enc, tok.eot_id, device, t.batch_size, t.margin, t.share_prefix),
        save=save,
        outputs=outputs,
        model=ddp_rm,
        eval_interval=t.eval_interval,
    )


def sft_source(sft_ckpt: Path) -> tuple[str, str]:
    """(data.source, data.corpus) an SFT run recorded, or ('none', '') for checkpoints of other runs."""
    from fastrlhf.train.sft import SFTDataConfig

    config = ckpt.read_state(sft_ckpt)["state"].get("config", {})
    if "data" not in config:
        return "none", ""
    data = from_dict(SFTDataConfig, config["data"], "data.")  # [model] may be any family's
    return data.source, data.corpus
