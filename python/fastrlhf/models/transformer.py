"""The decoder trunk, written once for every architecture.

An architecture (gpt2.py, llama.py) supplies an embedding, a list of blocks and a final norm; each block
answers three calls, and everything a trainer reads runs through them:

    block.norm_in(x)                      (B, T, C) -> (B, T, C): the attention sublayer's input norm
    block.project(h, positions, parts)    the heads of h: q (B, H, T, D), k and v (B, Hkv, T, D), any of
                                          them ("qkv", "q" or "kv"), rotary embeddings applied where the
                                          architecture has them
    block.finish(x, q, k, v, segment_ids) attention of q over k, v, the output projection, the residual
                                          and the MLP sublayer: the new residual stream at q's rows

Attention goes through ops.causal_attention with explicit segment ids, so one rule serves training
(Tq == Tk), packed documents (one segment per document), left-padded batches (pads in a segment of their
own) and KV-cache decoding (Tq < Tk: the queries sit at the end). On that interface the trunk offers:
`hidden` (training forward; `tail` reads only the last rows), `decode` (one KV-cache step), `hidden_at`
(one read token per row, e.g. a reward) and `shared_hidden` (a batch whose groups share a prefix, run
once per group: K-wise reward scoring).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fastrlhf import ops
from fastrlhf.io.hf import write_hf_folder
from fastrlhf.models.shared import SharedBatch

IGNORE_INDEX = -100  # targets equal to this are left out of the loss (torch's and HF's convention)


class KVCache:
    """Preallocated keys/values for every layer: (n_layer, B, Hkv, max_len, D). A forward with a cache
    writes its new keys at [length, length + T) and attends over [0, length + T); no concatenation."""

    def __init__(self, config: Any, batch_size: int, max_len: int, *, device=None, dtype=torch.float32):
        if max_len > config.block_size:
            raise ValueError(f"KVCache max_len must be <= block_size ({config.block_size}); got {max_len}")
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, Hkv, T, D) at [length, length + T); returns every cached key/value so far."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, Hkv, end, D) views


class Linear(nn.Linear):
    """nn.Linear (same parameters) computed by ops.linear: at inference a decode step's few rows take the
    fused rows kernel, which reads the weight once instead of running a GEMM tuned for many rows."""

    def forward(self, x: Tensor) -> Tensor:
        return ops.linear(x, self.weight, self.bias)


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


def load_checked(
    module: nn.Module, tensors: dict[str, Tensor], source: str, tied: tuple[str, ...] = ()
) -> None:
    """module.load_state_dict with errors that name the missing/unexpected/mis-shaped tensors; names
    ending in one of `tied` (parameters stored once under another name) are left out."""
    own = {k: v for k, v in module.state_dict().items() if not (tied and k.endswith(tied))}
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


class CausalLM(nn.Module):
    """A decoder-only language model: the trunk over an architecture's blocks, plus its LM head.
    Subclasses set `config`, `lm_head` and `tied` and define `embed`, `blocks` and `norm_f`."""

    config: Any
    lm_head: nn.Linear
    tied: tuple[str, ...] = ()
    """Parameter names stored once under another name (a tied LM head); left out of weights()."""

    def embed(self, idx: Tensor, positions: Tensor) -> Tensor:  # (B, T) -> (B, T, C)
        raise NotImplementedError

    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def norm_f(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    # ---- the trunk -----------------------------------------------------------------------------------
    def check_inputs(
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

    def _layers(
        self, x: Tensor, positions: Tensor, segment_ids: Tensor | None, cache: KVCache | None, tail: int
    ) -> Tensor:
        """Every block over the residual stream x (B, T, C); the last one keeps only the last `tail` rows'
        queries when tail > 0 (every row still gives its keys and values)."""
        blocks = self.blocks()
        for layer, block in enumerate(blocks):
            q, k, v = block.project(block.norm_in(x), positions, "qkv")  # (B, H | Hkv, T, D) each
            if cache is not None:
                k, v = cache.write(layer, k, v)  # (B, Hkv, cached + T, D)
            if tail and layer == len(blocks) - 1:
                q, x = q[:, :, -tail:], x[:, -tail:]  # (B, H, tail, D), (B, tail, C)
            x = block.finish(x, q, k, v, segment_ids)
        return x

    def hidden(
        self,
        idx: Tensor,
        *,
        positions: Tensor | None = None,
        segment_ids: Tensor | None = None,
        cache: KVCache | None = None,
        tail: int = 0,
    ) -> Tensor:
        """Final-norm hidden states (B, T, C) for tokens idx (B, T). tail > 0: only the last `tail`
        positions' states (B, tail, C); the last block then runs its queries, projection and MLP on those
        rows only (a scorer that reads the response, a prefill).

        positions (B, T) or (T,): defaults to cache.length + arange(T). segment_ids (B, cached + T): a key
        is visible only to queries of its own segment (left pads, packed documents); None = one segment.
        """
        past = cache.length if cache is not None else 0
        self.check_inputs(idx, positions, segment_ids, past)
        if not 0 <= tail <= idx.shape[1]:
            raise ValueError(f"tail must be in [0, T = {idx.shape[1]}]; got {tail}")
        if positions is None:
            positions = torch.arange(past, past + idx.shape[1], device=idx.device)  # (T,)
        x = self._layers(self.embed(idx, positions), positions, segment_ids, cache, tail)
        if cache is not None:
            cache.length += idx.shape[1]
        return self.norm_f(x)

    @torch.no_grad()
    def decode(self, idx: Tensor, positions: Tensor, segment_ids: Tensor, cache: KVCache) -> Tensor:
        """One KV-cache decode step, unchecked (generate validates once): final-norm hidden states (B, C)
        for one new token per row, idx and positions (B, 1), segment_ids (B, cache.length + 1)."""
        x = self._layers(self.embed(idx, positions), positions, segment_ids, cache, 0)  # (B, 1, C)
        cache.length += 1
        return self.norm_f(x[:, 0])  # (B, C)

    def hidden_at(
        self,
        idx: Tensor,
        index: Tensor,
        *,
        positions: Tensor | None = None,
        segment_ids: Tensor | None = None,
    ) -> Tensor:
        """(B, C) = self.hidden(idx, positions=..., segment_ids=...)[b, index[b]], with the last block's
        query, attention output, MLP and final norm run at that one token of each row (any padding)."""
        self.check_inputs(idx, positions, segment_ids, 0)
        B, T = idx.shape
        if index.shape != (B,) or bool(((index < 0) | (index >= T)).any()):
            raise ValueError(f"index must be (B,) = ({B},) with entries in [0, {T}); got {index.tolist()}")
        index = index.long()
        if positions is None:
            positions = torch.arange(T, device=idx.device)  # (T,)
        x = self.embed(idx, positions)  # (B, T, C)
        *body, block = self.blocks()
        for layer, blk in enumerate(body):
            q, k, v = blk.project(blk.norm_in(x), positions, "qkv")
            x = blk.finish(x, q, k, v, segment_ids)
        h = block.norm_in(x)  # (B, T, C)
        rows = torch.arange(B, device=idx.device)
        read_pos = positions.expand(B, T)[rows, index][:, None]  # (B, 1)
        k, v = block.project(h, positions, "kv")  # (B, Hkv, T, D) each
        (q,) = block.project(h[rows, index][:, None], read_pos, "q")  # (B, H, 1, D)
        seg = segment_ids
        if not bool((index == T - 1).all()):
            # rotate each row so its read token is the last column (where a lone query sits), and put the
            # tokens after it (rotated to the front) in a segment of their own, unseen by the query
            order = (torch.arange(T, device=idx.device) + index[:, None] + 1) % T  # (B, T)
            k = k.gather(2, order[:, None, :, None].expand_as(k))
            v = v.gather(2, order[:, None, :, None].expand_as(v))
            own = torch.zeros_like(idx) if segment_ids is None else segment_ids.long()  # (B, T)
            mine = own[rows, index][:, None]  # (B, 1) the read token's segment
            after = torch.arange(T, device=idx.device)[None] > index[:, None]  # (B, T)
            seg = torch.where(after, mine + 1, own).gather(1, order)  # (B, T)
        x = block.finish(x[rows, index][:, None], q, k, v, seg)  # (B, 1, C)
        return self.norm_f(x[:, 0])  # (B, C)

    def shared_hidden(self, b: SharedBatch) -> Tensor:
        """(N, C) final-norm hidden state at each sequence's last token; equals self.hidden(sequence)[last]
        for every member, with each group's shared prefix run once (models/shared.py lays the batch out)."""
        return self.norm_f(self._shared(b, read_last=True)[1][:, -1])  # (N, C)

    def shared_states(self, b: SharedBatch) -> tuple[Tensor | None, Tensor]:
        """Final-norm hidden states of every token: the prefixes' (G, Tp, C) (None when Tp = 0) and the
        suffixes' (N, Ts, C), each prefix run once per group (what a sequence's log-prob needs, e.g. DPO's
        K answers to one prompt)."""
        xp, xs = self._shared(b, read_last=False)
        return (None if xp is None else self.norm_f(xp)), self.norm_f(xs)

    def _shared(self, b: SharedBatch, read_last: bool) -> tuple[Tensor | None, Tensor]:
        """The residual streams after the last block: prefixes (G, Tp, C) or None, suffixes (N, Ts, C) (only
        each suffix's last row, (N, 1, C), with read_last: the last block then runs one query a sequence)."""
        if int(b.suffix_pos.max()) >= self.config.block_size:
            raise ValueError(
                f"sequences must be at most block_size = {self.config.block_size} tokens; "
                f"got {int(b.suffix_pos.max()) + 1}"
            )
        blocks = self.blocks()
        Tp = b.prefix.shape[1]
        xp = self.embed(b.prefix, b.prefix_pos) if Tp else None  # (G, Tp, C)
        xs = self.embed(b.suffix, b.suffix_pos)  # (N, Ts, C)
        for i, block in enumerate(blocks):
            cut = read_last and i == len(blocks) - 1
            h = block.norm_in(xs)  # (N, Ts, C)
            if cut:  # keys/values of every token, the query of the read token only
                (q,) = block.project(h[:, -1:], b.suffix_pos[:, -1:], "q")  # (N, H, 1, D)
                k, v = block.project(h, b.suffix_pos, "kv")  # (N, Hkv, Ts, D) each
                xs = xs[:, -1:]  # (N, 1, C)
            else:
                q, k, v = block.project(h, b.suffix_pos, "qkv")  # (N, H | Hkv, Ts, D) each
            if Tp:
                hp = block.norm_in(xp)  # (G, Tp, C)
                if cut:
                    kp, vp = block.project(hp, b.prefix_pos, "kv")  # (G, Hkv, Tp, D) each
                else:
                    qp, kp, vp = block.project(hp, b.prefix_pos, "qkv")
                    xp = block.finish(xp, qp, kp, vp, b.prefix_seg)
                # each member attends to its group's prefix: index_select's backward sums over the members
                k = torch.cat([kp.index_select(0, b.group), k], dim=2)  # (N, Hkv, Tp + Ts, D)
                v = torch.cat([vp.index_select(0, b.group), v], dim=2)
            xs = block.finish(xs, q, k, v, b.seg)
        return xp, xs

    # ---- the LM head and weights ---------------------------------------------------------------------
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

    def hf_config(self) -> dict[str, Any]:
        """config.json for transformers' AutoModelForCausalLM (each family writes its own)."""
        raise NotImplementedError

    def hf_tensors(self) -> dict[str, Tensor]:
        """The weights under Hugging Face's names and layouts (each family maps its own)."""
        raise NotImplementedError

    def save_pretrained(self, folder: str | os.PathLike, tokenizer: Any = None) -> Path:
        """A Hugging Face model folder (config.json, safetensors, generation_config.json with the EOS, and the
        tokenizer's files when one is given) that transformers.AutoModelForCausalLM.from_pretrained loads
        with equal logits; fastrlhf.from_pretrained reads it back."""
        generation = {"eos_token_id": tokenizer.eot_id} if tokenizer is not None else None
        return write_hf_folder(
            folder, self.hf_config(), self.hf_tensors(), generation_config=generation, tokenizer=tokenizer
        )

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # a tied matrix counts once

    def weights(self) -> dict[str, Tensor]:
        """Parameters by name, tied copies left out (they are stored once, under their owner's name)."""
        return {k: v for k, v in self.state_dict().items() if not (self.tied and k.endswith(self.tied))}

    def load_weights(self, tensors: dict[str, Tensor], source: str = "checkpoint") -> None:
        """Copy tensors in; every name and shape must match this model's config, or ValueError says which."""
        kept = {k: v for k, v in tensors.items() if not (self.tied and k.endswith(self.tied))}
        load_checked(self, kept, source, self.tied)
