"""Token sampling (temperature, top-k, top-p, min-p) as one fused pass per row, no vocabulary sort."""

from __future__ import annotations

import torch
from torch import Tensor

from fastrlhf._ext import HAS_EXT
from fastrlhf.ops import reference
from fastrlhf.ops._checks import same_device

if HAS_EXT:

    @torch.library.register_fake("fastrlhf::sample")
    def _sample_fake(
        logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor, seed: Tensor
    ) -> tuple[Tensor, Tensor]:
        B = logits.shape[0]
        return logits.new_empty((B,), dtype=torch.int64), logits.new_empty((B,), dtype=torch.float32)


def _per_row(x: float | Tensor, B: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A number or 0-d tensor becomes (B,); a (B,) tensor is converted; other shapes are refused in C++."""
    if isinstance(x, Tensor):
        x = x.to(device=device, dtype=dtype)
        return x.expand(B) if x.dim() == 0 else x
    return torch.full((B,), x, dtype=dtype, device=device)


def draw_seed(generator: torch.Generator | None = None) -> Tensor:
    """The (1,) int64 seed of the kernel's Philox streams, from `generator` (torch's default if None)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, generator=generator)


def sample(
    logits: Tensor,
    *,
    temperature: float | Tensor = 1.0,
    top_k: int | Tensor = 0,
    top_p: float | Tensor = 1.0,
    min_p: float | Tensor = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw one token per row of logits (B, V): tokens (B,) int64 and logprobs (B,) float32.

    Filters, in this order (each keeps ties; each parameter a number or a per-row (B,) tensor):
    temperature T (0 = greedy: the first argmax, no filters); top_k (keep logits >= the k-th largest;
    0 = off); top_p over the top-k survivors renormalised (keep token i iff the mass of survivors strictly
    more likely than i is < top_p; 1 = off); min_p (keep p_i >= min_p * p_max; 0 = off).
    logprobs is the log-prob of the token under the *unfiltered* softmax(logits / T) (T = 1 for greedy
    rows): the behaviour log-prob PPO's ratio uses. A seed drawn from `generator` keys a counter-based
    RNG (Philox, one stream per row), so tokens do not depend on the thread count. -inf logits ban
    tokens; NaN, +inf and all -inf rows are errors. fp32/fp64/bf16/fp16 logits; fp32 math (fp64 for fp64).
    """
    tensors = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p}
    same_device(logits=logits, **{n: t for n, t in tensors.items() if isinstance(t, Tensor)})
    if not HAS_EXT:
        return reference.sample(
            logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, generator=generator
        )
    B, dev = (logits.shape[0] if logits.dim() > 0 else 0), logits.device
    return torch.ops.fastrlhf.sample(
        logits,
        _per_row(temperature, B, torch.float64, dev),  # (B,)
        _per_row(top_k, B, torch.int64, dev),  # (B,)
        _per_row(top_p, B, torch.float64, dev),  # (B,)
        _per_row(min_p, B, torch.float64, dev),  # (B,)
        draw_seed(generator),  # (1,)
    )
