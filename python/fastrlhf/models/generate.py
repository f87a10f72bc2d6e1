"""Batched sampling with left padding and a preallocated KV cache; ops.sample picks each next token.

The prompt is run once (prefill) into the cache, then each step feeds one token per row. Rows that hit
EOS keep stepping (the batch moves together) but their later tokens are padding, masked out and given
logprob 0; the loop stops when every row is done."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fastrlhf import ops
from fastrlhf.models.transformer import CausalLM, KVCache, left_pad_layout


@dataclass
class Generation:
    sequences: Tensor
    """(B, Tp + Tr) int64: left-padded prompts followed by the responses."""
    prompt_mask: Tensor
    """(B, Tp) bool: True on real prompt tokens, False on left padding."""
    responses: Tensor
    """(B, Tr) int64: sampled tokens; padding after a row's EOS."""
    logprobs: Tensor
    """(B, Tr) float32: behaviour log-probs under softmax(logits / temperature), 0 where masked."""
    response_mask: Tensor
    """(B, Tr) bool: True up to and including the row's first EOS."""
    hidden: Tensor | None = None
    """(B, Tr, C) with return_hidden: the final-LayerNorm state that predicted each response token (what
    a value head on the policy's trunk reads), from the sampling pass itself."""

    def layout(self) -> tuple[Tensor, Tensor]:
        """positions, segment_ids (B, Tp + Tr) to re-score `sequences` exactly as they were sampled."""
        return left_pad_layout(torch.cat([self.prompt_mask, torch.ones_like(self.response_mask)], dim=1))


def _as_lists(prompts: Sequence[Sequence[int]] | Tensor) -> list[list[int]]:
    if isinstance(prompts, Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"prompts tensor must be (B, T); got {tuple(prompts.shape)}")
        return prompts.tolist()
    return [list(map(int, p.tolist() if isinstance(p, Tensor) else p)) for p in prompts]


@torch.no_grad()
def generate(
    model: CausalLM,
    prompts: Sequence[Sequence[int]] | Tensor,
    max_new_tokens: int,
    *,
    temperature: float | Tensor = 1.0,
    top_k: int | Tensor = 0,
    top_p: float | Tensor = 1.0,
    min_p: float | Tensor = 0.0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    return_hidden: bool = False,
    on_token: Callable[[Tensor], None] | None = None,
) -> Generation:
    """Sample up to max_new_tokens after each prompt (token-id lists of any lengths, or a (B, T) tensor).
    Sampling options as ops.sample (numbers or per-row (B,) tensors; temperature 0 = greedy).
    return_hidden=True also returns the hidden states behind each sampled token (Generation.hidden).
    on_token(tokens (B,)) is called after each step with the tokens just written (streaming output)."""
    cfg = model.config
    rows = _as_lists(prompts)
    if not rows:
        raise ValueError("prompts must hold at least one prompt; got none")
    lens = [len(r) for r in rows]
    if min(lens) == 0:
        raise ValueError(f"every prompt must hold at least one token; prompt {lens.index(0)} is empty")
    Tp = max(lens)
    if Tp > cfg.block_size:
        raise ValueError(
            f"prompt {lens.index(Tp)} has {Tp} tokens, longer than the context (block_size {cfg.block_size})"
        )
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int; got {max_new_tokens!r}")
    if Tp + max_new_tokens > cfg.block_size:
        raise ValueError(
            f"longest prompt ({Tp}) + max_new_tokens ({max_new_tokens}) = {Tp + max_new_tokens} exceeds "
            f"block_size {cfg.block_size}"
        )
    bad = [(i, t) for i, r in enumerate(rows) for t in r if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ValueError(f"token ids must be in [0, {cfg.vocab_size}); prompt {bad[0][0]} holds {bad[0][1]}")
    for name, tok in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if tok is not None and not 0 <= tok < cfg.vocab_size:
            raise ValueError(f"{name} must be in [0, {cfg.vocab_size}); got {tok}")

    device = next(model.parameters()).device
    B, total = len(rows), Tp + max_new_tokens
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    seq = torch.full((B, total), pad, dtype=torch.long)  # (B, Tp + max_new)
    seg = torch.zeros((B, total), dtype=torch.long)  # (B, Tp + max_new): 0 = left pad, 1 = real
    for b, r in enumerate(rows):
        seq[b, Tp - len(r) : Tp] = torch.tensor(r)
        seg[b, Tp - len(r) :] = 1
    seq, seg = seq.to(device), seg.to(device)
    responses = seq[:, Tp:]  # (B, max_new) view: the loop writes straight into seq
    logprobs = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
    mask = torch.zeros((B, max_new_tokens), dtype=torch.bool, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    next_pos = torch.tensor(lens, device=device)[:, None]  # (B, 1) position of the next token

    was_training = model.training
    model.eval()
    try:
        cache = KVCache(cfg, B, total, device=device, dtype=next(model.parameters()).dtype)
        positions = left_pad_layout(seg[:, :Tp])[0]  # (B, Tp)
        # the prefill caches every prompt row's keys and values; only the last row's state is read
        h = model.hidden(seq[:, :Tp], positions=positions, segment_ids=seg[:, :Tp], cache=cache, tail=1)[
            :, 0
        ]  # (B, C)
        hidden = (
            torch.empty((B, max_new_tokens, cfg.n_embd), device=device, dtype=h.dtype)
            if return_hidden
            else None
        )
        head = model.lm_head.weight  # (V, C), tied to wte
        steps, check_eos = max_new_tokens, eos_token_id is not None
        for t in range(max_new_tokens):
            if hidden is not None:
                hidden[:, t] = h
            logits = ops.linear(h, head).float()  # (B, V)
            tok, lp = ops.sample(
                logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, generator=generator
            )  # (B,), (B,)
            if check_eos:  # rows already done write padding; without an EOS no row is ever done
                responses[:, t] = torch.where(done, pad, tok)
                logprobs[:, t] = torch.where(done, 0.0, lp)
                mask[:, t] = ~done
                if on_token is not None:
                    on_token(responses[:, t])
                done |= tok == eos_token_id
                if bool(done.all()):
                    steps = t + 1
                    break
            else:
                responses[:, t], logprobs[:, t] = tok, lp
                if on_token is not None:
                    on_token(responses[:, t])
            if t + 1 < max_new_tokens:
                h = model.decode(responses[:, t : t + 1], next_pos, seg[:, : Tp + t + 1], cache)  # (B, C)
                next_pos += 1
        if not check_eos:
            mask[:, :steps] = True
    finally:
        model.train(was_training)
    return Generation(
        sequences=seq[:, : Tp + steps],
        prompt_mask=seg[:, :Tp].bool(),
        responses=responses[:, :steps],
        logprobs=logprobs[:, :steps],
        response_mask=mask[:, :steps],
        hidden=hidden[:, :steps] if hidden is not None else None,
    )


def sampling_dtype(name: str) -> torch.dtype:
    """The weights' dtype for a `--dtype` of 'fp32' or 'bf16' (on a CPU without AVX512-BF16 or AMX, bf16 runs
    far slower than fp32: a warning says so)."""
    if name not in ("fp32", "bf16"):
        raise ValueError(f"--dtype must be 'fp32' or 'bf16'; got {name!r}")
    if name == "fp32":
        return torch.float32
    from fastrlhf._ext import build_info

    if not any(build_info().get("cpu_bf16", {}).values()):
        import warnings

        warnings.warn(
            "--dtype bf16 on a CPU without AVX512-BF16 or AMX: bf16 matmuls run far slower than fp32 here",
            stacklevel=2,
        )
    return torch.bfloat16
