"""Preference optimisation from K-wise rankings: the math of DPO (Rafailov et al. 2023, arXiv 2305.18290),
IPO (Azar et al. 2023, arXiv 2310.12036) and the listwise Plackett-Luce form (DPO's appendix A.3).

A ranking of K answers to one prompt implies C(K, 2) (better, worse) pairs. Every loss here reads only
each answer's log-ratio r_k = log pi(y_k | x) - log pi_ref(y_k | x), so the K answers need K policy
forwards and K reference forwards, not 2 C(K, 2); `sequence_logprobs` runs them over a prefix-sharing
batch (models/shared.py) in which the prompt is computed once per ranking."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastrlhf import ops
from fastrlhf.models.shared import SharedBatch
from fastrlhf.models.transformer import CausalLM

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
