"""The GPT-2 architecture (arXiv 2005.14165 / Radford et al. 2019) in the shape of nanoGPT's model.py:
learned positions, pre-LayerNorm blocks, tanh-GELU MLP, tied input/output embeddings.

Attention goes through ops.causal_attention with explicit positions and segment ids, so one forward
serves training (Tq == Tk), packed documents (one segment per document), left-padded batches (pads in
their own segment, positions counted from each row's first real token) and KV-cache decoding (Tq < Tk).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastrlhf import ops
from fastrlhf.models.config import GPTConfig

TIED = "lm_head.weight"  # the output matrix is transformer.wte.weight; checkpoints store it once
IGNORE_INDEX = -100  # targets equal to this are left out of the loss (torch's and HF's convention)


class KVCache:
    """Preallocated keys/values for every layer: (n_layer, B, H, max_len, D). A forward with a cache
    writes its new keys at [length, length + T) and attends over [0, length + T); no concatenation."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, *, device=None, dtype=torch.float32):
        if max_len > config.block_size:
            raise ValueError(f"KVCache max_len must be <= block_size ({config.block_size}); got {max_len}")
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


class Linear(nn.Linear):
    """nn.Linear (same parameters) computed by ops.linear: at inference a decode step's few rows take the
    fused rows kernel, which reads the weight once instead of running a GEMM tuned for many rows."""

    def forward(self, x: Tensor) -> Tensor:
        return ops.linear(x, self.weight, self.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: Tensor, segment_ids: Tensor | None, cache: KVCache | None, layer: int, tail: int = 0
    ) -> Tensor:
        """(B, T, C), or with tail > 0 only the last `tail` rows' outputs (B, tail, C): every row's keys
        and values, the last rows' queries (the kernel places Tq < Tk queries at the end)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        if tail:
            q, T = q[:, -tail:], tail  # (B, tail, C)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, -1, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, Tk, D)
        v = v.view(B, -1, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, Tk, D)
        if cache is not None:
            end = cache.length + x.shape[1]
            cache.k[layer, :, :, cache.length : end] = k
            cache.v[layer, :, :, cache.length : end] = v
            k, v = cache.k[layer, :, :, :end], cache.v[layer, :, :, :end]  # (B, H, end, D) views
        y = ops.causal_attention(q, k, v, segment_ids=segment_ids)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        # GPT-2's "gelu_new" is the tanh approximation; HF weights only match with it.
        return self.dropout(self.c_proj(ops.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self, x: Tensor, segment_ids: Tensor | None, cache: KVCache | None, layer: int, tail: int = 0
    ) -> Tensor:
        a = self.attn(self.ln_1(x), segment_ids, cache, layer, tail)  # (B, tail or T, C)
        x = (x[:, -tail:] if tail else x) + a
        return x + self.mlp(self.ln_2(x))


def left_pad_layout(attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """positions, segment_ids (B, T) for a left-padded batch whose real tokens are attention_mask == 1:
    each row counts positions from its first real token, and pads sit in segment 0 of their own."""
    mask = attention_mask.long()
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, T)
    return positions, mask


def next_token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX) (the mean over kept targets; NaN when
    none is kept) through ops.token_logprobs, which streams each row once and writes d logits once
    instead of materialising log_softmax and its gradient: ~4x faster at (2048, 50257) on the CPU."""
    keep = targets != IGNORE_INDEX  # (B, T)
    logprobs = ops.token_logprobs(logits, torch.where(keep, targets, 0))  # (B, T)
    if logprobs.dtype != torch.float64:
        logprobs = logprobs.float()  # sum bf16/fp16 log-probs in fp32, as cross_entropy does under autocast
    return -(logprobs * keep).sum() / keep.sum()


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias),
            )
        )
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied (Press & Wolf 2017), as in GPT-2
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer) so the stream's variance stays put.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # the tied matrix counts once

    def _check_inputs(
        self, idx: Tensor, positions: Tensor | None, segment_ids: Tensor | None, past: int
    ) -> None:
        if idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(f"idx must be a (B, T) int64 tensor; got {tuple(idx.shape)} {idx.dtype}")
        B, T = idx.shape
        if T == 0:
            raise ValueError("idx must hold at least one token per row; got T = 0")
        if past + T > self.config.block_size:
            raise ValueError(
                f"sequence length {past + T} (cached {past} + new {T}) exceeds block_size {self.config.block_size}"
            )
        lo, hi = torch.aminmax(idx)
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(
                f"token ids must be in [0, {self.config.vocab_size}); got ids in [{int(lo)}, {int(hi)}]"
            )
        if positions is not None and positions.shape not in ((B, T), (T,)):
            raise ValueError(f"positions must be (B, T) = {(B, T)} or (T,); got {tuple(positions.shape)}")
        if segment_ids is not None and tuple(segment_ids.shape) != (B, past + T):
            raise ValueError(
                f"segment_ids must be (B, cached + T) = {(B, past + T)}; got {tuple(segment_ids.shape)}"
            )

    def hidden(
        self,
        idx: Tensor,
        *,
        positions: Tensor | None = None,
        segment_ids: Tensor | None = None,
        cache: KVCache | None = None,
        tail: int = 0,
    ) -> Tensor:
        """The trunk: final-LayerNorm hidden states (B, T, C) for tokens idx (B, T).
        tail > 0: only the last `tail` positions' states (B, tail, C); the last block then runs its
        queries, projection and MLP on those rows only (a scorer that reads the response, a prefill).

        positions (B, T) or (T,): defaults to cache.length + arange(T). segment_ids (B, cached + T): a key
        is visible only to queries of its own segment (left pads, packed documents); None = one segment.
        """
        past = cache.length if cache is not None else 0
        self._check_inputs(idx, positions, segment_ids, past)
        if positions is None:
            positions = torch.arange(past, past + idx.shape[1], device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))  # (B, T, C)
        if not 0 <= tail <= idx.shape[1]:
            raise ValueError(f"tail must be in [0, T = {idx.shape[1]}]; got {tail}")
        last = len(self.transformer.h) - 1
        for layer, block in enumerate(self.transformer.h):
            x = block(x, segment_ids, cache, layer, tail if layer == last else 0)
        if cache is not None:
            cache.length += idx.shape[1]
        return self.transformer.ln_f(x)

    @torch.no_grad()
    def decode(self, idx: Tensor, positions: Tensor, segment_ids: Tensor, cache: KVCache) -> Tensor:
        """One KV-cache decode step, unchecked (generate validates once): final-LayerNorm hidden states
        (B, C) for one new token per row, idx and positions (B, 1), segment_ids (B, cache.length + 1).
        The same ops in the same order as `hidden` (so the same numbers), minus what a one-token step
        does not need: module calls, input checks, dropout (eval only), the (B, T, C) reshapes."""
        B, C, H, L = idx.shape[0], self.config.n_embd, self.config.n_head, cache.length
        D, eps, tr = C // H, self.config.layer_norm_eps, self.transformer
        x = tr.wte.weight[idx[:, 0]] + tr.wpe.weight[positions[:, 0]]  # (B, C)
        for layer, block in enumerate(tr.h):
            a, m = block.attn, block.mlp
            qkv = ops.linear(
                F.layer_norm(x, (C,), block.ln_1.weight, block.ln_1.bias, eps), a.c_attn.weight, a.c_attn.bias
            )  # (B, 3C)
            q = qkv[:, :C].view(B, H, 1, D)  # (B, H, 1, D)
            cache.k[layer, :, :, L] = qkv[:, C : 2 * C].view(B, H, D)  # (B, H, D) into slot L
            cache.v[layer, :, :, L] = qkv[:, 2 * C :].view(B, H, D)
            y = ops.causal_attention(
                q, cache.k[layer, :, :, : L + 1], cache.v[layer, :, :, : L + 1], segment_ids=segment_ids
            )  # (B, H, 1, D)
            x = x + ops.linear(y.view(B, C), a.c_proj.weight, a.c_proj.bias)  # (B, C): heads side by side
            h = F.layer_norm(x, (C,), block.ln_2.weight, block.ln_2.bias, eps)
            h = ops.gelu(ops.linear(h, m.c_fc.weight, m.c_fc.bias))  # (B, 4C)
            x = x + ops.linear(h, m.c_proj.weight, m.c_proj.bias)  # (B, C)
        cache.length += 1
        return F.layer_norm(x, (C,), tr.ln_f.weight, tr.ln_f.bias, eps)  # (B, C)

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        *,
        positions: Tensor | None = None,
        segment_ids: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> tuple[Tensor | None, Tensor | None]:
        """Without targets: (logits (B, T, V), None). With targets (B, T) (IGNORE_INDEX = skip): (None, the
        mean next-token loss), through ops.linear_cross_entropy, which fuses the LM head with the loss and
        never holds the (B, T, V) logits (call again without targets for those)."""
        h = self.hidden(idx, positions=positions, segment_ids=segment_ids, cache=cache)  # (B, T, C)
        if targets is None:
            return self.lm_head(h), None
        return None, ops.linear_cross_entropy(h, self.lm_head.weight, targets, ignore_index=IGNORE_INDEX)

    def weights(self) -> dict[str, Tensor]:
        """Parameters by name, the tied lm_head left out (it is transformer.wte.weight)."""
        return {k: v for k, v in self.state_dict().items() if not k.endswith(TIED)}

    def load_weights(self, tensors: dict[str, Tensor], source: str = "checkpoint") -> None:
        """Copy tensors in; every name and shape must match this model's config, or ValueError says which."""
        load_checked(self, {k: v for k, v in tensors.items() if not k.endswith(TIED)}, source)


def load_checked(module: nn.Module, tensors: dict[str, Tensor], source: str) -> None:
    """module.load_state_dict with errors that name the missing/unexpected/mis-shaped tensors."""
    own = {k: v for k, v in module.state_dict().items() if not k.endswith(TIED)}
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    wrong = [
        f"{k}: expected {tuple(own[k].shape)}, got {tuple(tensors[k].shape)}"
        for k in own
        if k in tensors and tensors[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        parts = [
            f"missing {missing[:5]}" if missing else "",
            f"unexpected {unexpected[:5]}" if unexpected else "",
            f"wrong shapes: {'; '.join(wrong[:5])}" if wrong else "",
        ]
        raise ValueError(f"{source} does not match the model config: " + ", ".join(p for p in parts if p))
    module.load_state_dict(tensors, strict=False)
