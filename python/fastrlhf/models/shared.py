"""Scoring only what a reward needs: the scalar head reads one token per sequence, so two cuts of the
plain full forward give the same rewards and gradients with fewer FLOPs.

1. Read position only in the last block: every token still needs its keys/values there, but the query,
   attention, output projection, MLP, ln_f and head run at the one read token (2 C^2 of 12 C^2 per
   token instead of all of it).
2. Shared prefixes: a ranking's K responses share their prompt. `SharedBatch` lays a batch out as one
   prefix per group (run once) and one suffix per sequence; each layer's suffix queries attend to
   [the group's prefix keys/values, expanded over its members | the suffix's own], so the gradients of
   the K members sum back into the one prefix pass.

Both lay tokens out left-padded (pads in segment 0, real tokens in segment 1), so every sequence's read
token is the last column: with Tq = 1, ops.causal_attention puts the query at position Tk - 1.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from fastrlhf import ops
from fastrlhf.models.gpt import GPT, Block


@dataclass
class SharedBatch:
    """N token sequences in G groups (consecutive members) whose members share a prefix."""

    prefix: Tensor  # (G, Tp) each group's shared prefix, left-padded (Tp may be 0)
    prefix_pos: Tensor  # (G, Tp) positions counted from the first real token (pads 0)
    suffix: Tensor  # (N, Ts) the rest of each sequence (>= 1 token), left-padded: last token at Ts - 1
    suffix_pos: Tensor  # (N, Ts) positions continuing the group's prefix
    group: Tensor  # (N,) int64 the group of each sequence
    prefix_seg: Tensor | None  # (G, Tp) 1 real / 0 pad; None when no prefix has pads
    seg: Tensor | None  # (N, Tp + Ts) 1 real / 0 pad over [group's prefix | suffix]; None without pads

    def to(self, device: torch.device | str) -> SharedBatch:
        return SharedBatch(
            **{f.name: None if (t := getattr(self, f.name)) is None else t.to(device) for f in fields(self)}
        )


def common_prefix(seqs: list[list[int]]) -> int:
    """Length of the longest common prefix of seqs, capped so every sequence keeps >= 1 token after it
    (the read token is the last one; a truncated response or K = 1 simply shares less)."""
    n = min(map(len, seqs)) - 1
    for i in range(n):
        t = seqs[0][i]
        if any(s[i] != t for s in seqs):
            return i
    return max(n, 0)


def shared_layout(seqs: list[list[int]], sizes: list[int], pad_id: int) -> SharedBatch:
    """SharedBatch of seqs (N non-empty id lists) in groups of consecutive `sizes` (sum = N)."""
    if sum(sizes) != len(seqs) or min(sizes, default=1) < 1 or any(not s for s in seqs):
        raise ValueError(f"sizes must be >= 1 and sum to {len(seqs)} non-empty sequences; got {sizes}")
    starts = [sum(sizes[:g]) for g in range(len(sizes))]
    cut = [common_prefix(seqs[a : a + n]) for a, n in zip(starts, sizes)]  # (G,) prefix length per group
    group = [g for g, n in enumerate(sizes) for _ in range(n)]  # (N,)
    Tp, Ts = max(cut), max(len(s) - cut[g] for s, g in zip(seqs, group))
    prefix = torch.full((len(sizes), Tp), pad_id, dtype=torch.long)  # (G, Tp)
    prefix_real = torch.zeros(len(sizes), Tp, dtype=torch.long)  # (G, Tp)
    for g, (a, c) in enumerate(zip(starts, cut)):
        if c:
            prefix[g, Tp - c :] = torch.tensor(seqs[a][:c])
            prefix_real[g, Tp - c :] = 1
    suffix = torch.full((len(seqs), Ts), pad_id, dtype=torch.long)  # (N, Ts)
    suffix_real = torch.zeros(len(seqs), Ts, dtype=torch.long)  # (N, Ts)
    for n, (s, g) in enumerate(zip(seqs, group)):
        suffix[n, Ts - len(s) + cut[g] :] = torch.tensor(s[cut[g] :])
        suffix_real[n, Ts - len(s) + cut[g] :] = 1
    group_t = torch.tensor(group, dtype=torch.long)
    prefix_pos = (prefix_real.cumsum(1) - 1).clamp(min=0)  # (G, Tp)
    offset = torch.tensor(cut, dtype=torch.long)[group_t, None]  # (N, 1) prefix length of each member
    suffix_pos = torch.where(suffix_real.bool(), suffix_real.cumsum(1) - 1 + offset, 0)  # (N, Ts)
    seg = torch.cat([prefix_real[group_t], suffix_real], dim=1)  # (N, Tp + Ts)
    return SharedBatch(
        prefix,
        prefix_pos,
        suffix,
        suffix_pos,
        group_t,
        None if bool(prefix_real.all()) else prefix_real,
        None if bool(seg.all()) else seg,
    )


def _heads(block: Block, t: Tensor) -> Tensor:
    B, T, _ = t.shape
    return t.view(B, T, block.attn.n_head, block.attn.head_dim).transpose(1, 2)  # (B, H, T, D)


def _project(block: Block, h: Tensor, part: slice) -> list[Tensor]:
    """Rows `part` (in units of C: 0 = q, 1 = k, 2 = v) of c_attn applied to h (B, T, C), as heads."""
    C, lin = h.shape[-1], block.attn.c_attn
    w = lin.weight[part.start * C : part.stop * C]  # ((stop - start) C, C): a contiguous row slice
    b = None if lin.bias is None else lin.bias[part.start * C : part.stop * C]
    return [_heads(block, t) for t in ops.linear(h, w, b).split(C, dim=2)]  # each (B, H, T, D)


def _finish(block: Block, x: Tensor, q: Tensor, k: Tensor, v: Tensor, seg: Tensor | None) -> Tensor:
    """The rest of Block.forward for queries q (B, H, Tq, D) whose residual stream is x (B, Tq, C)."""
    B, Tq, C = x.shape
    y = ops.causal_attention(q, k, v, segment_ids=seg).transpose(1, 2).reshape(B, Tq, C)  # (B, Tq, C)
    x = x + block.attn.resid_dropout(block.attn.c_proj(y))
    return x + block.mlp(block.ln_2(x))


def _embed(gpt: GPT, idx: Tensor, pos: Tensor) -> Tensor:
    tr = gpt.transformer
    return tr.drop(tr.wte(idx) + tr.wpe(pos))  # (B, T, C)


def shared_hidden(gpt: GPT, b: SharedBatch) -> Tensor:
    """(N, C) final-LayerNorm hidden state at each sequence's last token; equals
    gpt.hidden(sequence)[last] for every member, with each prefix run once per group."""
    if int(b.suffix_pos.max()) >= gpt.config.block_size:
        raise ValueError(
            f"sequences must be at most block_size = {gpt.config.block_size} tokens; "
            f"got {int(b.suffix_pos.max()) + 1}"
        )
    blocks = gpt.transformer.h
    Tp = b.prefix.shape[1]
    xp = _embed(gpt, b.prefix, b.prefix_pos) if Tp else None  # (G, Tp, C)
    xs = _embed(gpt, b.suffix, b.suffix_pos)  # (N, Ts, C)
    for i, block in enumerate(blocks):
        last = i == len(blocks) - 1
        h = block.ln_1(xs)  # (N, Ts, C)
        if last:  # keys/values of every token, the query of the read token only
            (q,) = _project(block, h[:, -1:], slice(0, 1))  # (N, H, 1, D)
            k, v = _project(block, h, slice(1, 3))  # (N, H, Ts, D) each
            xs = xs[:, -1:]  # (N, 1, C)
        else:
            q, k, v = _project(block, h, slice(0, 3))  # (N, H, Ts, D) each
        if Tp:
            hp = block.ln_1(xp)  # (G, Tp, C)
            if last:
                kp, vp = _project(block, hp, slice(1, 3))  # (G, H, Tp, D) each
            else:
                qp, kp, vp = _project(block, hp, slice(0, 3))
                xp = _finish(block, xp, qp, kp, vp, b.prefix_seg)
            # each member attends to its group's prefix: index_select's backward sums over the members
            k = torch.cat([kp.index_select(0, b.group), k], dim=2)  # (N, H, Tp + Ts, D)
            v = torch.cat([vp.index_select(0, b.group), v], dim=2)
        xs = _finish(block, xs, q, k, v, b.seg)
    return gpt.transformer.ln_f(xs[:, -1])  # (N, C)


def hidden_at(
    gpt: GPT,
    idx: Tensor,
    index: Tensor,
    *,
    positions: Tensor | None = None,
    segment_ids: Tensor | None = None,
) -> Tensor:
    """(B, C) = gpt.hidden(idx, positions=..., segment_ids=...)[b, index[b]], with the last block's query,
    attention output, MLP and ln_f run at that one token of each row (any padding layout)."""
    gpt._check_inputs(idx, positions, segment_ids, 0)
    B, T = idx.shape
    if index.shape != (B,) or bool(((index < 0) | (index >= T)).any()):
        raise ValueError(f"index must be (B,) = ({B},) with entries in [0, {T}); got {index.tolist()}")
    index = index.long()
    if positions is None:
        positions = torch.arange(T, device=idx.device)  # (T,)
    x = _embed(gpt, idx, positions)  # (B, T, C)
    *body, block = gpt.transformer.h
    for layer, blk in enumerate(body):
        x = blk(x, segment_ids, None, layer)
    h = block.ln_1(x)  # (B, T, C)
    rows = torch.arange(B, device=idx.device)
    k, v = _project(block, h, slice(1, 3))  # (B, H, T, D) each
    (q,) = _project(block, h[rows, index][:, None], slice(0, 1))  # (B, H, 1, D)
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
    x = _finish(block, x[rows, index][:, None], q, k, v, seg)  # (B, 1, C)
    return gpt.transformer.ln_f(x[:, 0])  # (B, C)
