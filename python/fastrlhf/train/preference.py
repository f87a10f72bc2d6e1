"""Preference optimisation from K-wise rankings: the math of DPO (Rafailov et al. 2023, arXiv 2305.18290),
IPO (Azar et al. 2023, arXiv 2310.12036) and the listwise Plackett-Luce form (DPO's appendix A.3).

A ranking of K answers to one prompt implies C(K, 2) (better, worse) pairs. Every loss here reads only
each answer's log-ratio r_k = log pi(y_k | x) - log pi_ref(y_k | x), so the K answers need K policy
forwards and K reference forwards, not 2 C(K, 2); `sequence_logprobs` runs them over a prefix-sharing
batch (models/shared.py) in which the prompt is computed once per ranking."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fastrlhf import ops
from fastrlhf.models.shared import SharedBatch, shared_layout
from fastrlhf.models.transformer import CausalLM
from fastrlhf.train import dist

LOSSES = ("sigmoid", "ipo", "plackett_luce")


def sequence_logprobs(model: CausalLM, b: SharedBatch, response_len: Tensor) -> Tensor:
    """(N,) sum over the last response_len[n] tokens of sequence n of log pi(token | everything before it):
    the answer's log-likelihood given its prompt. Every answer must keep >= 1 token before its response
    (its prompt), which shared_layout's prefix cut leaves in place."""
    prefix, suffix = model.shared_states(b)  # (G, Tp, C) or None, (N, Ts, C)
    (N, Ts), Tp = b.suffix.shape, b.prefix.shape[1]
    real = (
        b.seg[:, Tp:].bool() if b.seg is not None else torch.ones_like(b.suffix, dtype=torch.bool)
    )  # (N, Ts)
    first = Ts - real.sum(dim=1, keepdim=True)  # (N, 1) each suffix's first real column (left padding)
    # the state that predicts suffix column j is column j - 1, or, at a suffix's first real column, its
    # group's last prefix state: put that state in front (column 0) and gather
    lead = prefix[b.group, -1:] if prefix is not None else suffix.new_zeros(N, 1, suffix.shape[-1])
    cols = torch.arange(Ts, device=suffix.device)[None]  # (1, Ts)
    pick = torch.where(cols > first, cols, 0)  # (N, Ts) columns of [lead | suffix] (suffix j - 1 is j)
    both = torch.cat([lead, suffix], dim=1)  # (N, 1 + Ts, C)
    states = both.gather(1, pick[..., None].expand(-1, -1, both.shape[-1]))  # (N, Ts, C)
    in_response = (cols >= Ts - response_len[:, None]) & real  # (N, Ts): answers end at the right edge
    total = (ops.token_logprobs(model.lm_head(states), b.suffix) * in_response).sum(dim=1)  # (N,)
    inside = (response_len - real.sum(dim=1)).clamp(min=0)  # (N,) answer tokens inside the shared prefix
    if prefix is not None and bool(inside.any()):  # answers that begin alike: their first tokens are shared
        lp = ops.token_logprobs(model.lm_head(prefix[:, :-1]), b.prefix[:, 1:])  # (G, Tp - 1): columns 1..
        take = torch.arange(1, Tp, device=lp.device)[None] >= Tp - inside[:, None]  # (N, Tp - 1)
        total = total + (lp[b.group] * take).sum(dim=1)
    return total


def pair_loss(
    logratios: Tensor, better: Tensor, worse: Tensor, owner: Tensor, beta: float, kind: str
) -> Tensor:
    """Mean over rankings of the mean over each ranking's pairs of
    sigmoid: -log sigmoid(beta (r_b - r_w))           (DPO, eq. 7)
    ipo:     (r_b - r_w - 1 / (2 beta))^2             (IPO, eq. 17, with tau = beta)
    logratios (N,); better, worse, owner (P,) as the reward model's batches give them."""
    h = logratios[better] - logratios[worse]  # (P,)
    if kind == "sigmoid":
        per_pair = -F.logsigmoid(beta * h)
    elif kind == "ipo":
        per_pair = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"pair loss must be 'sigmoid' or 'ipo'; got {kind!r}")
    n = int(owner.max()) + 1
    total = per_pair.new_zeros(n).index_add(0, owner, per_pair)  # (n,)
    count = per_pair.new_zeros(n).index_add(0, owner, torch.ones_like(per_pair))
    return (total / count).mean()


def plackett_luce_loss(logratios: Tensor, order: Tensor, beta: float) -> Tensor:
    """Mean over rankings of -log P(order) under the Plackett-Luce model with scores beta * r:
    -sum_k [beta r_{o_k} - log sum_{j >= k} exp(beta r_{o_j})]. order (R, K) indexes logratios best
    first, -1 past a ranking's own K (rankings of different sizes in one batch)."""
    valid = order >= 0  # (R, K)
    s = torch.where(valid, beta * logratios[order.clamp(min=0)], -torch.inf)  # (R, K)
    tail = torch.logcumsumexp(s.flip(1), dim=1).flip(1)  # (R, K): log sum_{j >= k} exp(s_j)
    terms = torch.where(valid, s - tail, 0.0)  # the last valid term is 0 by construction
    return -terms.sum(dim=1).mean()


# --- batches of rankings and their metrics (train/dpo.py, benchmarks/bench_dpo.py) -------------------------


@dataclass
class Encoded:
    """One ranking, encoded: each answer as prompt + answer + end ids, how many of its last tokens are the
    answer, its (better, worse) pairs (ties left out), its order (best first) and, once computed, the
    reference's log-likelihood of each answer (K,)."""

    seqs: list[list[int]]
    answer_len: list[int]
    pairs: list[tuple[int, int]]
    order: tuple[int, ...]
    ref: Tensor | None = None


@dataclass
class RankingBatch:
    """R rankings of N answers in all, laid out for sequence_logprobs (each prompt once)."""

    layout: SharedBatch
    answer_len: Tensor  # (N,) answer tokens at the right edge of each sequence
    better: Tensor  # (P,) indices into N of every pair's better answer
    worse: Tensor  # (P,) ... and its worse one
    owner: Tensor  # (P,) the ranking each pair belongs to
    order: Tensor  # (R, K_max) indices into N, best first; -1 past a ranking's own K
    ref: Tensor | None  # (N,) the reference's log-likelihoods, when computed

    def to(self, device: torch.device) -> RankingBatch:
        keep = {"layout": self.layout.to(device), "ref": None if self.ref is None else self.ref.to(device)}
        rest = ("answer_len", "better", "worse", "owner", "order")
        return RankingBatch(**keep, **{k: getattr(self, k).to(device) for k in rest})


def ranking_batch(batch: list[Encoded], pad_id: int) -> RankingBatch:
    """The batch's answers laid out for sequence_logprobs, with its pairs and orders as indices into them."""
    better, worse, owner, base = [], [], [], 0
    order = torch.full((len(batch), max(len(e.seqs) for e in batch)), -1, dtype=torch.long)  # (R, K_max)
    for i, e in enumerate(batch):
        better += [base + b for b, _ in e.pairs]
        worse += [base + w for _, w in e.pairs]
        owner += [i] * len(e.pairs)
        order[i, : len(e.order)] = torch.tensor(e.order) + base
        base += len(e.seqs)
    refs = [e.ref for e in batch]
    return RankingBatch(
        shared_layout([s for e in batch for s in e.seqs], [len(e.seqs) for e in batch], pad_id),
        torch.tensor([n for e in batch for n in e.answer_len]),
        torch.tensor(better, dtype=torch.long),
        torch.tensor(worse, dtype=torch.long),
        torch.tensor(owner, dtype=torch.long),
        order,
        None if any(r is None for r in refs) else torch.cat(refs),
    )


def preference_loss(logratios: Tensor, b: RankingBatch, beta: float, kind: str) -> Tensor:
    """The loss `kind` (one of LOSSES) of a batch's log-ratios (N,): mean over its rankings."""
    if kind == "plackett_luce":
        return plackett_luce_loss(logratios, b.order, beta)
    return pair_loss(logratios, b.better, b.worse, b.owner, beta, kind)


def pair_sums(logratios: Tensor, b: RankingBatch, beta: float) -> Tensor:
    """(6,) float64 sums that make the logged means over several batches and ranks (see `means`): pairs,
    answers, chosen and rejected rewards (beta r), pairs ordered right (r_better > r_worse), and -r."""
    r = logratios.detach().double()
    rb, rw = r[b.better], r[b.worse]  # (P,) each
    counts = torch.tensor([len(rb), len(r)], dtype=torch.float64, device=r.device)
    return torch.cat(
        [counts, torch.stack([beta * rb.sum(), beta * rw.sum(), (rb > rw).double().sum(), -r.sum()])]
    )


def means(sums: Tensor, prefix: str = "") -> dict[str, float]:
    """Means over pairs of the rewards and the pairwise accuracy, and kl_ref: the mean over answers of
    log pi_ref(y) - log pi(y), the k1 estimate of KL(pi_ref || pi) per answer when the answers are samples
    of the reference (the label stage samples them from the SFT model, at its temperature)."""
    pairs, answers, chosen, rejected, right, minus_r = dist.all_sum(sums).tolist()
    return {
        f"{prefix}rewards_chosen": chosen / pairs,
        f"{prefix}rewards_rejected": rejected / pairs,
        f"{prefix}reward_margin": (chosen - rejected) / pairs,
        f"{prefix}accuracy": right / pairs,
        f"{prefix}kl_ref": minus_r / answers,
    }
