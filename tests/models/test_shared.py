"""model.shared: the prefix-sharing, read-position-only reward forward equals the plain full forward,
in value and in every parameter's gradient (float64), on ugly batches."""

from __future__ import annotations

import pytest
import torch
from fastrlhf import ops
from fastrlhf.models import GPTConfig, ScalarHeadModel, left_pad_layout
from fastrlhf.models.shared import common_prefix, shared_layout
from fastrlhf.ops import reference

V = 53


def model(seed: int = 0, dtype=torch.float64, **kw) -> ScalarHeadModel:
    torch.manual_seed(seed)
    cfg = GPTConfig(
        **{**dict(vocab_size=V, block_size=48, n_layer=3, n_head=2, n_embd=16, dropout=0.0), **kw}
    )
    rm = ScalarHeadModel(cfg).to(dtype)
    with torch.no_grad():  # unit LayerNorm gains and zero biases would hide a mis-wired one
        for p in rm.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return rm


def rankings(seed: int = 1) -> tuple[list[list[int]], list[int]]:
    """Groups with K = 2..5, prompts of 0..17 tokens, length-1 responses, identical responses, a
    response that is a prefix of another (truncated), and K = 1."""
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(0, V, (n,), generator=g).tolist()

    groups = []
    for K, P in [(2, 9), (3, 17), (5, 4), (4, 1), (2, 0)]:
        p = ids(P)
        groups.append([p + ids(1 + (j * 5) % 11) for j in range(K)])
    groups[1][2] = groups[1][2][: 17 + 1]  # a response cut to one token after the prompt
    s = ids(12)
    groups.append([s, list(s), s[:7]])  # identical and truncated: the prefix stops one token short
    groups.append([ids(6)])  # K = 1
    return [x for grp in groups for x in grp], [len(grp) for grp in groups]


def full_rewards(rm: ScalarHeadModel, seqs: list[list[int]]) -> torch.Tensor:
    """The plain forward: one right-padded batch, the value at each sequence's last token."""
    T = max(map(len, seqs))
    idx = torch.tensor([s + [0] * (T - len(s)) for s in seqs])  # (N, T)
    last = torch.tensor([len(s) - 1 for s in seqs])  # (N,)
    return rm(idx).gather(1, last[:, None]).squeeze(1)  # (N,)


def value_and_grads(rm: ScalarHeadModel, fn, w: torch.Tensor):
    rm.zero_grad(set_to_none=True)
    r = fn()
    (r * w).sum().backward()
    return r.detach(), {n: p.grad.clone() for n, p in rm.named_parameters()}


def assert_same(a, b, tol=1e-11):
    torch.testing.assert_close(a[0], b[0], rtol=tol, atol=tol)
    assert a[1].keys() == b[1].keys()
    for n in a[1]:
        torch.testing.assert_close(a[1][n], b[1][n], rtol=tol, atol=tol, msg=n)


def test_common_prefix_keeps_one_token_per_sequence():
    assert common_prefix([[1, 2, 3], [1, 2, 4, 5]]) == 2
    assert common_prefix([[1, 2, 3], [1, 2, 3]]) == 2
    assert common_prefix([[1, 2, 3], [1, 2]]) == 1
    assert common_prefix([[7]]) == 0 and common_prefix([[1, 2], [3, 2]]) == 0


@pytest.mark.parametrize("bias", [True, False])
def test_shared_forward_equals_full_forward_float64(bias):
    rm = model(bias=bias)
    seqs, sizes = rankings()
    w = torch.randn(len(seqs), dtype=torch.float64)
    layout = shared_layout(seqs, sizes, pad_id=5)
    assert layout.seg is not None and layout.prefix_seg is not None  # the batch exercises the pads
    assert_same(
        value_and_grads(rm, lambda: rm(shared=layout), w),
        value_and_grads(rm, lambda: full_rewards(rm, seqs), w),
    )


def test_shared_forward_without_padding_or_prefix():
    rm = model(1)
    g = torch.Generator().manual_seed(3)
    p = torch.randint(0, V, (6,), generator=g).tolist()
    seqs = [p + torch.randint(0, V, (5,), generator=g).tolist() for _ in range(4)]
    layout = shared_layout(seqs, [2, 2], pad_id=0)
    assert layout.seg is None and layout.prefix_seg is None and layout.prefix.shape == (2, 6)
    w = torch.randn(4, dtype=torch.float64)
    assert_same(
        value_and_grads(rm, lambda: rm(shared=layout), w),
        value_and_grads(rm, lambda: full_rewards(rm, seqs), w),
    )
    singles = shared_layout([[3], [4, 9]], [1, 1], pad_id=0)  # a one-token sequence: nothing to share
    assert_same(
        value_and_grads(rm, lambda: rm(shared=singles), w[:2]),
        value_and_grads(rm, lambda: full_rewards(rm, [[3], [4, 9]]), w[:2]),
    )


def test_shared_forward_float32_close_and_no_grad():
    rm = model(2, torch.float32)
    seqs, sizes = rankings(4)
    with torch.no_grad():  # the no-grad path takes ops.linear's rows kernel for the read tokens
        got, want = rm(shared=shared_layout(seqs, sizes, 0)), full_rewards(rm, seqs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["right", "left", "segments"])
def test_score_reads_one_token_and_equals_the_full_values(layout):
    rm = model(3)
    B, T = 5, 19
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, V, (B, T), generator=g)
    index = torch.tensor([18, 3, 0, 11, 18])
    kw = {}
    if layout == "left":
        mask = (torch.arange(T)[None] >= torch.tensor([0, 2, 0, 7, 18])[:, None]).long()  # (B, T)
        positions, segment_ids = left_pad_layout(mask)
        kw = dict(positions=positions, segment_ids=segment_ids)
        index = torch.tensor([18, 3, 5, 11, 18])
    elif layout == "segments":  # packed documents: 0 0 0 1 1 1 ... per row
        kw = dict(segment_ids=torch.arange(T).div(4, rounding_mode="floor").expand(B, T).contiguous())
    w = torch.randn(B, dtype=torch.float64)
    ours = value_and_grads(rm, lambda: rm.score(idx, index, **kw), w)
    want = value_and_grads(rm, lambda: rm(idx, **kw).gather(1, index[:, None]).squeeze(1), w)
    assert_same(ours, want)
    torch.testing.assert_close(
        rm.trunk.hidden_at(idx, index, **kw), rm.trunk.hidden(idx, **kw)[torch.arange(B), index]
    )


def test_attention_kv_gradients_for_a_lone_query_with_segments():
    """The last block's call: Tq = 1 (or Tq < Tk) with segment ids; the kernel's dk/dv cover every key."""
    g = torch.Generator().manual_seed(6)
    for Tq, Tk in [(1, 37), (5, 70)]:
        q = torch.randn(3, 2, Tq, 8, dtype=torch.float64, generator=g)
        k, v = (torch.randn(3, 2, Tk, 8, dtype=torch.float64, generator=g) for _ in range(2))
        seg = (torch.rand(3, Tk, generator=g) > 0.3).long()
        seg[:, -Tq:] = 1
        dout = torch.randn(3, 2, Tq, 8, dtype=torch.float64, generator=g)
        got, want = [], []
        for fn, out in ((ops.causal_attention, got), (reference.causal_attention, want)):
            x = [t.clone().requires_grad_() for t in (q, k, v)]
            y = fn(*x, segment_ids=seg)
            out += [y, *torch.autograd.grad(y, x, dout)]
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert got[2][..., : Tk - Tq, :].abs().sum() > 0  # keys before the first query get gradient


def test_bad_inputs():
    rm = model()
    with pytest.raises(ValueError, match=r"sizes must be >= 1 and sum to 2 non-empty sequences; got \[1\]"):
        shared_layout([[1], [2]], [1], 0)
    with pytest.raises(ValueError, match=r"sizes must be >= 1 and sum to 2 non-empty sequences; got \[2\]"):
        shared_layout([[1], []], [2], 0)
    with pytest.raises(ValueError, match="at most block_size = 48 tokens; got 49"):
        rm(shared=shared_layout([[1] * 49, [1] * 40], [2], 0))
    with pytest.raises(
        ValueError, match=r"index must be \(B,\) = \(2,\) with entries in \[0, 3\); got \[0, 3\]"
    ):
        rm.score(torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="pass either idx or shared"):
        rm(torch.zeros(1, 2, dtype=torch.long), shared=shared_layout([[1]], [1], 0))


@pytest.mark.parametrize("bias", [True, False])
def test_shared_states_equal_every_tokens_full_forward_float64(bias):
    rm = model(bias=bias)
    seqs, sizes = rankings()
    b = shared_layout(seqs, sizes, pad_id=0)
    prefix, suffix = rm.trunk.shared_states(b)  # (G, Tp, C), (N, Ts, C)
    Tp, Ts = b.prefix.shape[1], b.suffix.shape[1]
    for n, s in enumerate(seqs):
        full = rm.trunk.hidden(torch.tensor([s]))[0]  # (T, C)
        g = int(b.group[n])
        cut = int(b.prefix_seg[g].sum()) if b.prefix_seg is not None else (Tp if prefix is not None else 0)
        if cut:
            torch.testing.assert_close(prefix[g, Tp - cut :], full[:cut])
        rest = len(s) - cut
        torch.testing.assert_close(suffix[n, Ts - rest :], full[cut:])
