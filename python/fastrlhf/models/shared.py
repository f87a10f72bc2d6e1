"""The batch layout for scoring only what a reward needs (the trunk's `hidden_at` and `shared_hidden`,
models/transformer.py, run it): the scalar head reads one token per sequence, so two cuts of the
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
