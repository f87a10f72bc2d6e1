"""Pure-PyTorch ground truth for every fused op: the tests and benchmarks compare against these,
and the public ops fall back to them when the extension is absent. Written for clarity, not speed."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """GAE as the reverse loop TRL/OpenRLHF/cleanrl write, vectorised over rows.

    V_{t+1} and A_{t+1} count as 0 past the last masked-in token of each row (arXiv 1506.02438, eq. 16).
    """
    B, T = rewards.shape
    mask = mask.bool()
    t_idx = torch.arange(T, device=rewards.device)
    last = torch.where(mask, t_idx, -1).amax(dim=1) if T > 0 else torch.full((B,), -1)  # (B,)
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        live = t <= last  # (B,)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = torch.where(live, delta + gamma * lam * next_adv, 0)
        next_value = torch.where(live, values[:, t], 0)
        advantages[:, t] = next_adv
    returns = advantages + values
    zero = torch.zeros((), dtype=rewards.dtype)
    return torch.where(mask, advantages, zero), torch.where(mask, returns, zero)


def _math_dtype(t: Tensor) -> torch.dtype:
    """float64 stays float64; every other float type is computed in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def gelu(x: Tensor) -> Tensor:
    """GPT-2's "gelu_new", F.gelu(x, approximate="tanh"): 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3).

    Written as x sigmoid(2u), which equals it and keeps the negative tail's relative accuracy (1 + tanh(u)
    cancels). |x| is clamped at 30 inside, which changes nothing for finite x (sigmoid(2u) is exactly 0 or
    1 there, even in float64) and makes -inf give the limit 0 instead of -inf * 0 = NaN. Math in float32
    (float64 for float64), result in x's dtype.
    """
    xm = x.to(_math_dtype(x))
    xc = xm.clamp(-30.0, 30.0)
    z = 2 * math.sqrt(2 / math.pi) * (xc + 0.044715 * xc**3)  # 2u
    return (xm.clamp(min=-30.0) * torch.sigmoid(z)).to(x.dtype)


def attention_mask(Tq: int, Tk: int, segment_ids: Tensor | None, device: torch.device) -> Tensor:
    """(Tq, Tk) or (B, Tq, Tk) bool: query i sits at position p = i + Tk - Tq and sees key j iff
    j <= p and, with segment_ids (B, Tk), segment_ids[b, j] == segment_ids[b, p]."""
    pos = torch.arange(Tq, device=device) + (Tk - Tq)  # (Tq,)
    allowed = torch.arange(Tk, device=device)[None, :] <= pos[:, None]  # (Tq, Tk)
    if segment_ids is None:
        return allowed
    seg_q = segment_ids[:, Tk - Tq :]  # (B, Tq)
    return allowed[None] & (seg_q[:, :, None] == segment_ids[:, None, :])  # (B, Tq, Tk)


def causal_attention(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, segment_ids: Tensor | None = None
) -> Tensor:
    """softmax(q k^T * scale + mask) v with grouped-query heads; q (B, H, Tq, D), k, v (B, Hkv, Tk, D)."""
    _B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    dt = _math_dtype(q)
    k = k.to(dt).repeat_interleave(H // Hkv, dim=1)  # (B, H, Tk, D)
    v = v.to(dt).repeat_interleave(H // Hkv, dim=1)  # (B, H, Tk, D)
    scores = (q.to(dt) @ k.transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    allowed = attention_mask(Tq, Tk, segment_ids, q.device)
    allowed = allowed[:, None] if allowed.dim() == 3 else allowed  # (B, 1, Tq, Tk) or (Tq, Tk)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).to(q.dtype)  # (B, H, Tq, D)


def _per_row(x: float | Tensor, B: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    if isinstance(x, Tensor):
        return x.to(device=device, dtype=dtype).expand(B)
    return torch.full((B,), x, dtype=dtype, device=device)


def sample_filter(
    logits: Tensor,
    *,
    temperature: float | Tensor = 1.0,
    top_k: int | Tensor = 0,
    top_p: float | Tensor = 1.0,
    min_p: float | Tensor = 0.0,
) -> Tensor:
    """(B, V) log-probs of the distribution `sample` draws from; -inf outside the allowed set.

    Filters apply in this order, each keeping ties: temperature; top_k (keep tokens whose scaled logit
    is >= the k-th largest; 0 = off); top_p over the top-k survivors renormalised (keep token i iff the
    mass of survivors strictly more likely than i is < top_p; 1 = off); min_p (keep p_i >= min_p * p_max;
    0 = off). A row with temperature 0 puts all mass on its first argmax.
    """
    B, V = logits.shape
    dev = logits.device
    temp = _per_row(temperature, B, torch.float64, dev)
    k = _per_row(top_k, B, torch.int64, dev)
    p = _per_row(top_p, B, torch.float64, dev)
    mp = _per_row(min_p, B, torch.float64, dev)
    x = logits.double()
    scaled = x / torch.where(temp > 0, temp, 1.0)[:, None]  # (B, V)
    keep = torch.ones_like(scaled, dtype=torch.bool)
    kth = torch.sort(scaled, dim=1, descending=True).values.gather(1, (k.clamp(1, V) - 1)[:, None])  # (B, 1)
    keep &= torch.where((k > 0)[:, None], scaled >= kth, True)
    probs = torch.softmax(scaled.masked_fill(~keep, float("-inf")), dim=1)  # (B, V) top-k renormalised
    # mass of tokens strictly more likely than each token, by one sort (no (B, V, V) temporary)
    sp, idx = torch.sort(probs, dim=1, descending=True)  # (B, V)
    csum = torch.cumsum(sp, dim=1) - sp
    # ties: the first of a run of equal probabilities carries the mass strictly above the run
    first = torch.searchsorted(-sp, -sp, right=False)
    above = torch.empty_like(probs).scatter_(1, idx, csum.gather(1, first))  # (B, V)
    keep &= torch.where((p < 1)[:, None], above < p[:, None], True)
    keep &= probs >= mp[:, None] * probs.amax(dim=1, keepdim=True)
    out = torch.log_softmax(scaled.masked_fill(~keep, float("-inf")), dim=1)
    greedy = torch.full_like(out, float("-inf")).scatter_(1, x.argmax(dim=1, keepdim=True), 0.0)
    return torch.where((temp == 0)[:, None], greedy, out)


def sample(
    logits: Tensor,
    *,
    temperature: float | Tensor = 1.0,
    top_k: int | Tensor = 0,
    top_p: float | Tensor = 1.0,
    min_p: float | Tensor = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """tokens (B,) int64 drawn from sample_filter's distribution, and logprobs (B,) float32: the log-prob
    of each token under the *unfiltered* softmax(logits / temperature) (temperature 1 for greedy rows)."""
    B = logits.shape[0]
    filtered = sample_filter(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    tokens = torch.multinomial(filtered.exp(), 1, generator=generator).squeeze(1)  # (B,)
    temp = _per_row(temperature, B, torch.float64, logits.device)
    scaled = logits.double() / torch.where(temp > 0, temp, 1.0)[:, None]
    logprobs = torch.log_softmax(scaled, dim=1).gather(1, tokens[:, None]).squeeze(1)
    return tokens, logprobs.float()


def token_logprobs(
    logits: Tensor, targets: Tensor, *, temperature: float = 1.0, return_entropy: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """log softmax(logits / temperature)[target] over the last dim, and that distribution's entropy."""
    logp = torch.log_softmax(logits.to(_math_dtype(logits)) / temperature, dim=-1)  # (..., V)
    out = logp.gather(-1, targets[..., None]).squeeze(-1).to(logits.dtype)  # (...)
    if not return_entropy:
        return out
    # p log p -> 0 where p == 0 (logit -inf, e.g. a padded vocabulary): 0 * -inf would be NaN, and
    # filling logp (not the product) keeps the gradient finite too.
    entropy = -(logp.exp() * logp.masked_fill(logp == float("-inf"), 0.0)).sum(-1)  # (...)
    return out, entropy.to(logits.dtype)


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, *, ignore_index: int = -100
) -> Tensor:
    """F.cross_entropy(hidden @ weight.T, targets, ignore_index): the mean over kept targets (NaN if none)."""
    logits = (hidden @ weight.t()).to(_math_dtype(hidden))  # (..., V)
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index
    )


PPO_STATS = (
    "pg_loss",
    "v_loss",
    "clipfrac",
    "vf_clipfrac",
    "approx_kl",
    "ratio_mean",
    "ratio_max",
    "entropy",
)


def ppo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip_range: float = 0.2,
    clip_range_value: float = 0.2,
    vf_coef: float = 0.1,
    entropy: Tensor | None = None,
    ent_coef: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate + clipped value loss (arXiv 1707.06347; TRL/lm-human-preferences form), masked
    token means over (B, T). loss = pg_loss + vf_coef * v_loss - ent_coef * mean(entropy)."""
    dt = _math_dtype(logprobs)
    m = mask.to(dt)
    n = m.sum().clamp(min=1)

    def masked_mean(x: Tensor) -> Tensor:
        return (x.to(dt) * m).sum() / n

    log_ratio = logprobs.to(dt) - old_logprobs.to(dt)
    ratio = torch.exp(log_ratio)
    adv = advantages.to(dt)
    pg_losses = -adv * ratio
    pg_losses2 = -adv * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    pg_loss = masked_mean(torch.maximum(pg_losses, pg_losses2))
    vals, old_vals, ret = values.to(dt), old_values.to(dt), returns.to(dt)
    v_clipped = old_vals + torch.clamp(vals - old_vals, -clip_range_value, clip_range_value)
    vf_losses1, vf_losses2 = (vals - ret) ** 2, (v_clipped - ret) ** 2
    v_loss = 0.5 * masked_mean(torch.maximum(vf_losses1, vf_losses2))
    ent = masked_mean(entropy) if entropy is not None else torch.zeros((), dtype=dt)
    loss = pg_loss + vf_coef * v_loss - ent_coef * ent
    with torch.no_grad():
        live = mask.bool()
        stats = {
            "pg_loss": pg_loss.detach(),
            "v_loss": v_loss.detach(),
            "clipfrac": masked_mean((pg_losses2 > pg_losses).to(dt)),
            "vf_clipfrac": masked_mean((vf_losses2 > vf_losses1).to(dt)),
            "approx_kl": masked_mean((ratio - 1) - log_ratio),  # k3, http://joschu.net/blog/kl-approx.html
            "ratio_mean": masked_mean(ratio),
            "ratio_max": ratio[live].max() if live.any() else torch.zeros((), dtype=dt),
            "entropy": ent.detach(),
        }
    return loss.to(logprobs.dtype), stats


POLICY_STATS = (
    "pg_loss",
    "kl",
    "clipfrac_low",
    "clipfrac_high",
    "approx_kl",
    "ratio_mean",
    "ratio_max",
    "entropy",
)
POLICY_AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    agg: str = "token_mean",
    ref_logprobs: Tensor | None = None,
    beta: float = 0.0,
    max_len: int | None = None,
    entropy: Tensor | None = None,
    ent_coef: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The critic-free policy loss (GRPO arXiv 2402.03300, Dr. GRPO 2503.20783, DAPO 2503.14476, RLOO,
    REINFORCE++): per token l = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) [+ beta k3(ref || pi) when
    beta > 0] [- ent_coef H when ent_coef > 0], r = exp(logprobs - old_logprobs), aggregated by `agg`:
    token_mean (sum of m l / sum of m), seq_mean_token_mean (mean over rows of each row's token mean),
    seq_mean_token_sum_norm (mean over rows of each row's sum / max_len, max_len defaulting to T). Rows
    whose mask sums to 0 are left out of the mean over rows; sums of m are clamped at 1, as TRL does.
    advantages (B, T), or (B,) broadcast over each row's tokens. Stats: masked token means."""
    if agg not in POLICY_AGGS:
        raise ValueError(f"agg must be one of {', '.join(POLICY_AGGS)}; got {agg!r}")
    dt = _math_dtype(logprobs)
    m = mask.to(dt)  # (B, T)
    n = m.sum().clamp(min=1)

    def masked_mean(x: Tensor) -> Tensor:
        return (x.to(dt) * m).sum() / n

    adv = advantages.to(dt)
    adv = adv[:, None] if adv.dim() == 1 else adv  # (B, 1) or (B, T)
    log_ratio = logprobs.to(dt) - old_logprobs.to(dt)
    ratio = torch.exp(log_ratio)
    pg_losses = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    per_token = pg_losses
    if ref_logprobs is not None:
        d = ref_logprobs.to(dt) - logprobs.to(dt)
        kl = torch.exp(d) - d - 1  # k3, http://joschu.net/blog/kl-approx.html (GRPO eqs. 3-4)
        if beta > 0:
            per_token = per_token + beta * kl
    if entropy is not None and ent_coef > 0:
        per_token = per_token - ent_coef * entropy.to(dt)
    row_sums = (per_token * m).sum(1)  # (B,)
    row_tokens = m.sum(1)  # (B,)
    n_rows = (row_tokens > 0).sum().clamp(min=1)  # rows with no token count for nothing
    if agg == "token_mean":
        loss = row_sums.sum() / n
    elif agg == "seq_mean_token_mean":
        loss = (row_sums / row_tokens.clamp(min=1)).sum() / n_rows
    else:
        max_len = max(logprobs.shape[1], 1) if max_len is None else max_len  # T (a T = 0 batch has no token)
        loss = (row_sums / max_len).sum() / n_rows
    with torch.no_grad():
        live = mask.bool()
        zero = torch.zeros((), dtype=dt, device=logprobs.device)
        stats = {
            "pg_loss": masked_mean(pg_losses),
            "kl": masked_mean(kl) if ref_logprobs is not None else zero,
            "clipfrac_low": masked_mean((ratio < 1 - eps_low) & (adv < 0)),
            "clipfrac_high": masked_mean((ratio > 1 + eps_high) & (adv > 0)),
            "approx_kl": masked_mean((ratio - 1) - log_ratio),  # k3 between new and old
            "ratio_mean": masked_mean(ratio),
            "ratio_max": ratio[live].max() if live.any() else zero,
            "entropy": masked_mean(entropy) if entropy is not None else zero,
        }
    return loss.to(logprobs.dtype), stats


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x / sqrt(mean(x^2, last dim) + eps) * weight in fp32 (fp64 for fp64), (x r) w in that order as HF's
    LlamaRMSNorm rounds it in fp32, rounded once to x's dtype (HF rounds x r to x's dtype before the gain
    and promotes to the weight's dtype: the benchmarks' baseline, hf_rms_norm)."""
    dt = _math_dtype(x)
    xf = x.to(dt)
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * r * weight.to(dt)).to(x.dtype)


def hf_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """HF's LlamaRMSNorm.forward as written in transformers: the PyTorch a user would write."""
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up (Shazeer 2020, arXiv 2002.05202), in gate's dtype."""
    return F.silu(gate) * up


def hf_swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """HF's LlamaMLP gate as written there, act_fn(gate_proj(x)) * up_proj(x): the benchmarks' baseline."""
    return F.silu(gate) * up


def rope_cos_sin(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin (..., T, D/2) fp32 of the angles float(positions) * inv_freq (an fp32 product, as HF's
    `inv_freq @ positions`), each the fp32 rounding of the exact value (HF's fp32 cos/sin are within 1 ulp)."""
    angles = positions[..., None].float() * inv_freq.float()  # (B, T, D/2) or (T, D/2)
    return angles.double().cos().float(), angles.double().sin().float()


def rope(x: Tensor, positions: Tensor, inv_freq: Tensor) -> Tensor:
    """Rotary embeddings in HF's half-split layout on x (B, T, H, D), returned as (B, H, T, D): the pairs
    (x[i], x[i + D/2]) rotate by angle i of rope_cos_sin; math in fp32 (fp64 for fp64)."""
    dt = _math_dtype(x)
    cos, sin = (
        t.to(dt)[..., None, :] for t in rope_cos_sin(positions, inv_freq)
    )  # (B, T, 1, D/2) or (T, 1, D/2)
    x1, x2 = x.to(dt).chunk(2, dim=-1)  # (B, T, H, D/2) each
    y = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)  # (B, T, H, D)
    return y.transpose(1, 2).contiguous().to(x.dtype)  # (B, H, T, D)


def hf_rope_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """HF's LlamaRotaryEmbedding.forward: cos, sin (B, T, D) computed in fp32 and cast to `dtype`; HF runs
    it once per model forward and shares it across the layers."""
    pos = positions if positions.dim() == 2 else positions[None]  # (B or 1, T)
    freqs = (inv_freq[None, :, None].float() @ pos[:, None, :].float()).transpose(1, 2)  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def hf_apply_rotary_pos_emb(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """HF's apply_rotary_pos_emb on q (B, H, T, D), k (B, Hkv, T, D) (in HF, transposed views of the
    projections) with cos, sin (B, T, D)."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D)

    def rotate_half(x: Tensor) -> Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def hf_rope(q: Tensor, k: Tensor, positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """What HF's Llama attention does from the projections' (B, T, H, D) views: transpose to (B, H, T, D),
    LlamaRotaryEmbedding's cos/sin and apply_rotary_pos_emb. The tests' measure of torch's own error."""
    cos, sin = hf_rope_cos_sin(positions, inv_freq, q.dtype)
    return hf_apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
