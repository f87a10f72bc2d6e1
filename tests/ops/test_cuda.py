"""The ops on CUDA tensors against the references (marked `gpu`: skipped without a CUDA device).

FASTRLHF_TEST_DEVICE=cpu runs the same tests on the CPU kernels, which checks the tests themselves on a
machine without a GPU. Tolerances (STYLE.md): float64 paths close to the float64 reference; bf16/fp16
within twice PyTorch's own error in that dtype (the reference on the same half inputs)."""

from __future__ import annotations

import os

import fastrlhf
import pytest
import torch
from fastrlhf.ops import (
    causal_attention,
    gae,
    ppo_loss,
    reference,
    rms_norm,
    rope,
    sample,
    swiglu,
    token_logprobs,
)

DEV = os.environ.get("FASTRLHF_TEST_DEVICE", "cuda")
pytestmark = [] if DEV == "cpu" else [pytest.mark.gpu]
HALF = [torch.bfloat16, torch.float16]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    return ((got - want).norm() / want.norm().clamp(min=1e-30)).item()


def test_build_has_cuda_kernels():
    if DEV == "cuda":
        assert fastrlhf._C.build_info()["cuda"], "this extension was built without its CUDA kernels"


# ---- gae ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,T", [(1, 1), (3, 7), (5, 97), (64, 512), (2, 3000)])
def test_gae_float64_equals_reference(B, T):
    r, v = torch.randn(B, T, dtype=torch.float64), torch.randn(B, T, dtype=torch.float64)
    mask = torch.arange(T) < torch.randint(0, T + 1, (B,))[:, None]
    mask[0, T // 2] = False  # a hole inside a response
    got = gae(r.to(DEV), v.to(DEV), mask.to(DEV), gamma=0.99, lam=0.95)
    want = reference.gae(r, v, mask, gamma=0.99, lam=0.95)
    for a, b in zip(got, want):
        assert a.device.type == DEV and torch.equal(a.cpu(), b)  # no FMA: bit for bit


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_gae_low_precision(dtype):
    r, v = torch.randn(8, 300), torch.randn(8, 300)
    mask = torch.arange(300) < torch.randint(0, 301, (8,))[:, None]
    got = gae(r.to(DEV, dtype), v.to(DEV, dtype), mask.to(DEV))
    exact = reference.gae(r.double(), v.double(), mask)
    own = reference.gae(r.to(dtype), v.to(dtype), mask)  # torch's own error in this dtype
    for a, e, o in zip(got, exact, own):
        assert a.dtype == dtype and rel_err(a, e) <= max(2 * rel_err(o, e), 2e-6)


# ---- ppo_loss -----------------------------------------------------------------------------------------
def ppo_inputs(B, T, dtype, weights=False):
    lp = torch.randn(B, T, dtype=torch.float64) * 0.3
    olp = lp + torch.randn(B, T, dtype=torch.float64) * 0.2
    vals = torch.randn(B, T, dtype=torch.float64)
    xs = [
        lp,
        olp,
        torch.randn(B, T, dtype=torch.float64),
        vals,
        vals + 0.3 * torch.randn(B, T, dtype=torch.float64),
    ]
    xs.append(torch.randn(B, T, dtype=torch.float64))
    mask = torch.rand(B, T) > 0.3
    mask = torch.rand(B, T, dtype=torch.float64) * mask if weights else mask
    ent = torch.rand(B, T, dtype=torch.float64) * 3
    return [x.to(dtype) for x in xs], mask.to(dtype) if weights else mask, ent.to(dtype)


def ppo_run(fn, xs, mask, ent, dev):
    xs = [x.to(dev).clone() for x in xs]
    ent = ent.to(dev).clone().requires_grad_()
    xs[0].requires_grad_(), xs[3].requires_grad_()
    loss, stats = fn(*xs, mask.to(dev), entropy=ent, ent_coef=0.01, vf_coef=0.5)
    loss.backward()
    return [loss, *[stats[k] for k in reference.PPO_STATS], xs[0].grad, xs[3].grad, ent.grad]


@pytest.mark.parametrize("B,T", [(64, 512), (3, 97), (1, 1)])
@pytest.mark.parametrize("weights", [False, True])
def test_ppo_loss_float64_matches_reference(B, T, weights):
    xs, mask, ent = ppo_inputs(B, T, torch.float64, weights)
    got = ppo_run(ppo_loss, xs, mask, ent, DEV)
    cpu = ppo_run(ppo_loss, xs, mask, ent, "cpu")
    want = ppo_run(reference.ppo_loss, xs, mask, ent, "cpu")
    for i, (a, c, b) in enumerate(zip(got, cpu, want)):
        torch.testing.assert_close(a.cpu(), c, rtol=1e-9, atol=1e-12)
        # vf_clipfrac: the kernels take v_c = v inside the clip range, the reference rounds
        # v_old + (v - v_old) and counts those rounding ties as clipped (a documented deviation)
        if i != 1 + reference.PPO_STATS.index("vf_clipfrac"):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_ppo_loss_low_precision(dtype):
    xs, mask, ent = ppo_inputs(16, 300, dtype)
    got = ppo_run(ppo_loss, xs, mask, ent, DEV)
    exact = ppo_run(reference.ppo_loss, [x.double() for x in xs], mask, ent.double(), "cpu")
    own = ppo_run(reference.ppo_loss, xs, mask, ent, "cpu")
    for a, e, o in zip(got, exact, own):
        assert abs(a.double().cpu() - e).max() <= 2 * abs(o.double() - e).max() + 1e-6 * (1 + e.abs().max())


# ---- token_logprobs -----------------------------------------------------------------------------------
def logprob_run(fn, logits, targets, temperature):
    x = logits.clone().requires_grad_()
    lp, ent = fn(x, targets, temperature=temperature, return_entropy=True)
    gen = torch.Generator().manual_seed(7)  # the same output gradients for every run
    g1, g2 = (torch.randn(lp.shape, dtype=torch.float64, generator=gen) for _ in range(2))
    ((lp.double() * g1.to(lp.device)).sum() + (ent.double() * g2.to(ent.device)).sum()).backward()
    return lp, ent, x.grad


@pytest.mark.parametrize("shape", [(7, 1000), (3, 5, 50304), (1, 1), (4, 9, 3)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_float64_matches_reference(shape, temperature):
    torch.manual_seed(1)
    logits = torch.randn(*shape, dtype=torch.float64) * 3
    if shape[-1] > 1:
        logits.view(-1, shape[-1])[0, 0] = float("-inf")  # a banned token: p log p -> 0
    targets = (
        torch.randint(1, shape[-1], shape[:-1])
        if shape[-1] > 1
        else torch.zeros(shape[:-1], dtype=torch.long)
    )
    got = logprob_run(token_logprobs, logits.to(DEV), targets.to(DEV), temperature)
    want = logprob_run(reference.token_logprobs, logits, targets, temperature)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_token_logprobs_strided_view_low_precision(dtype):
    B, T, V = 3, 17, 4099  # V odd: rows start off 16-byte boundaries
    full = (torch.randn(B, T, V) * 2).to(dtype)
    logits = full[:, :-1]  # (B, T - 1, V), a view: read in place
    targets = torch.randint(0, V, (B, T - 1))
    got = logprob_run(token_logprobs, logits.to(DEV), targets.to(DEV), 0.9)
    exact = logprob_run(reference.token_logprobs, logits.double(), targets, 0.9)
    own = logprob_run(reference.token_logprobs, logits, targets, 0.9)
    for a, e, o in zip(got, exact, own):
        assert a.dtype == dtype and rel_err(a, e) <= max(2 * rel_err(o, e), 1e-6)


def test_token_logprobs_bad_target_raises():
    logits, targets = torch.randn(4, 10, device=DEV), torch.tensor([1, 2, 10, 3], device=DEV)
    with pytest.raises(
        ValueError, match=r"targets must be in \[0, V\) = \[0, 10\); got 10 at position \(2\)"
    ):
        token_logprobs(logits, targets)


# ---- sample -------------------------------------------------------------------------------------------
FILTERS = [
    {},
    {"top_k": 50},
    {"top_p": 0.9},
    {"top_k": 200, "top_p": 0.8, "min_p": 0.05},
    {"min_p": 0.1, "temperature": 0.7},
    {"top_p": 1e-6},
    {"temperature": 0.0},
]


@pytest.mark.parametrize("filters", FILTERS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sample_same_tokens_as_cpu_and_allowed(filters, dtype):
    B, V = 37, 5003
    logits = (torch.randn(B, V) * 3).to(dtype)
    logits[3, :100] = float("-inf")
    gen = torch.Generator().manual_seed(123)
    tok, lp = sample(logits.to(DEV), generator=gen, **filters)
    tok2, lp2 = sample(logits.to(DEV), generator=torch.Generator().manual_seed(123), **filters)
    assert torch.equal(tok, tok2) and torch.equal(lp, lp2), "not deterministic"
    cpu_tok, _ = sample(logits, generator=torch.Generator().manual_seed(123), **filters)
    # the same Philox uniform per row: the same tokens up to draws landing on a rounding boundary
    assert (tok.cpu() != cpu_tok).sum() <= 1
    allowed = reference.sample_filter(logits, **filters)  # (B, V) -inf outside the allowed set
    assert torch.isfinite(allowed.gather(1, tok.cpu()[:, None])).all()
    temp = filters.get("temperature", 1.0) or 1.0
    want = torch.log_softmax(logits.double() / temp, dim=1).gather(1, tok.cpu()[:, None]).squeeze(1)
    torch.testing.assert_close(lp.cpu().double(), want, rtol=1e-5, atol=1e-5)


def test_sample_distribution_follows_top_p():
    V, N = 12, 40000
    logits = torch.linspace(-2, 2, V).repeat(N, 1)  # (N, V): N independent rows of one distribution
    tok, _ = sample(logits.to(DEV), top_p=0.7, generator=torch.Generator().manual_seed(5))
    freq = torch.bincount(tok.cpu(), minlength=V).double() / N
    want = reference.sample_filter(logits[:1], top_p=0.7).exp()[0].double()
    assert (freq - want).abs().max() < 0.01


def test_sample_large_vocab_and_per_row_params():
    B, V = 64, 50304
    logits = torch.randn(B, V, device=DEV) * 2
    k = torch.randint(0, 100, (B,), device=DEV)
    p = torch.rand(B, device=DEV, dtype=torch.float64) * 0.9 + 0.05
    tok, lp = sample(logits, top_k=k, top_p=p, generator=torch.Generator().manual_seed(0))
    allowed = reference.sample_filter(logits.cpu(), top_k=k.cpu(), top_p=p.cpu())
    assert torch.isfinite(allowed.gather(1, tok.cpu()[:, None])).all() and torch.isfinite(lp).all()


def same_as_cpu(logits: torch.Tensor, **filters) -> None:
    """CUDA tokens: allowed, deterministic, the CPU's for the same seed (up to one boundary draw)."""
    gen = lambda: torch.Generator().manual_seed(11)
    tok, lp = sample(logits.to(DEV), generator=gen(), **filters)
    tok2, lp2 = sample(logits.to(DEV), generator=gen(), **filters)
    assert torch.equal(tok, tok2) and torch.equal(lp, lp2), "not deterministic"
    cpu_tok, _ = sample(logits, generator=gen(), **filters)
    assert (tok.cpu() != cpu_tok).sum() <= 1
    allowed = reference.sample_filter(logits, **filters)  # (B, V)
    assert torch.isfinite(allowed.gather(1, tok.cpu()[:, None])).all()


@pytest.mark.parametrize(
    "filters",
    [{"top_k": 50, "top_p": 0.9}, {"top_p": 0.9}, {"top_k": 3000}, {"top_p": 0.3, "min_p": 0.02}],
    ids=str,
)
def test_sample_large_vocab_same_as_cpu(filters):
    # rows of 16-byte aligned bf16 (the vector loads) and fp16 / fp32 rows with a ragged tail
    same_as_cpu((torch.randn(12, 50304) * 3).bfloat16(), **filters)
    same_as_cpu((torch.randn(5, 30011) * 2).half(), **filters)
    same_as_cpu(torch.randn(5, 30011) * 4, **filters)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("filters", [{"top_k": 50}, {"top_p": 0.6}, {"top_k": 9000, "top_p": 0.9}], ids=str)
def test_sample_crowded_boundary_bins(filters, dtype):
    # three logit values: the boundary bin holds ~V/3 ties, more than shared memory takes (radix select)
    same_as_cpu(torch.randint(0, 3, (6, 30011)).to(dtype), **filters)
    # all equal but one: every token in the max's bin
    flat = torch.zeros(3, 30011, dtype=dtype)
    flat[:, 7] = 1
    same_as_cpu(flat, **filters)


@pytest.mark.parametrize(
    "bad,match",
    [
        ("nan", "must not contain NaN; row 2"),
        ("inf", r"must not contain \+inf; row 2"),
        ("ninf", "row 2 is all -inf"),
    ],
)
def test_sample_bad_rows_raise(bad, match):
    logits = torch.randn(4, 100)
    logits[2] = {"nan": float("nan"), "inf": float("inf"), "ninf": float("-inf")}[bad]
    with pytest.raises(ValueError, match=match):
        sample(logits.to(DEV))


def test_sample_bad_parameter_raises():
    temp = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64, device=DEV)
    with pytest.raises(
        ValueError, match=r"temperature must be finite and >= 0 \(0 = greedy\); got -1 at row 1"
    ):
        sample(torch.randn(3, 10, device=DEV), temperature=temp)


# ---- causal_attention ---------------------------------------------------------------------------------
def attn_run(fn, q, k, v, dout, **kw):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    out.backward(dout)
    return out, q.grad, k.grad, v.grad


def attn_inputs(B, H, Hkv, Tq, Tk, D, seg):
    q, dout = torch.randn(B, H, Tq, D), torch.randn(B, H, Tq, D)
    k, v = torch.randn(B, Hkv, Tk, D), torch.randn(B, Hkv, Tk, D)
    segment_ids = None
    if seg:  # packed documents, and a left-padded row
        segment_ids = torch.cumsum(torch.rand(B, Tk) < 0.05, dim=1)
        segment_ids[0, : Tk // 3] = -1
    return q, k, v, dout, segment_ids


SHAPES = [  # B, H, Hkv, Tq, Tk, D
    (2, 6, 2, 97, 97, 59),
    (1, 4, 4, 40, 130, 64),  # KV-cache: Tq < Tk
    (3, 8, 2, 1, 300, 128),  # decode: Tq = 1
    (1, 2, 1, 33, 33, 256),
    (2, 2, 2, 5, 5, 1),
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("seg", [False, True])
def test_attention_float32_matches_reference(shape, seg):
    q, k, v, dout, segment_ids = attn_inputs(*shape, seg)
    to = lambda t: None if t is None else t.to(DEV)
    got = attn_run(causal_attention, to(q), to(k), to(v), to(dout), segment_ids=to(segment_ids))
    exact = attn_run(
        reference.causal_attention, q.double(), k.double(), v.double(), dout.double(), segment_ids=segment_ids
    )
    for name, a, e in zip(["out", "dq", "dk", "dv"], got, exact):
        assert a.dtype == torch.float32 and rel_err(a, e) < 1e-5, name


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
def test_attention_half_within_twice_pytorch_error(dtype, shape):
    q, k, v, dout, segment_ids = attn_inputs(*shape, True)
    half = [t.to(dtype) for t in (q, k, v, dout)]
    to = lambda t: None if t is None else t.to(DEV)
    got = attn_run(causal_attention, *[to(t) for t in half], segment_ids=to(segment_ids))
    exact = attn_run(
        reference.causal_attention, q.double(), k.double(), v.double(), dout.double(), segment_ids=segment_ids
    )
    own = attn_run(reference.causal_attention, *half, segment_ids=segment_ids)
    for name, a, e, o in zip(["out", "dq", "dk", "dv"], got, exact, own):
        assert a.dtype == dtype and rel_err(a, e) <= 2 * rel_err(o, e), name


MMA_SHAPES = [  # B, H, Hkv, Tq, Tk: the tensor-core forward (bf16/fp16, D 64/128, Tq >= 16)
    (2, 4, 2, 200, 200),  # GQA, T not a multiple of 64
    (1, 3, 1, 16, 16),
    (1, 2, 2, 64, 64),
    (2, 2, 1, 100, 333),  # KV cache: Tq < Tk, ragged
    (1, 2, 1, 130, 4000),
]


def exact_lse(q, k, v, scale, segment_ids):
    """float64 log-sum-exp of each query's visible scaled scores: (B, H, Tq)."""
    H, Tq = q.shape[1], q.shape[2]
    Hkv, Tk = k.shape[1], k.shape[2]
    kk = k.repeat_interleave(H // Hkv, dim=1)  # (B, H, Tk, D)
    s = (q @ kk.transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    pos = torch.arange(Tq)[:, None] + Tk - Tq
    ok = torch.arange(Tk)[None, :] <= pos  # (Tq, Tk)
    if segment_ids is not None:
        ok = ok & (segment_ids[:, None, :] == segment_ids[:, pos[:, 0]][:, :, None])[:, None]
    return s.masked_fill(~ok, float("-inf")).logsumexp(-1)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("shape", MMA_SHAPES, ids=str)
@pytest.mark.parametrize("seg", [False, True])
def test_attention_mma_forward(dtype, D, shape, seg):
    q, k, v, _, segment_ids = attn_inputs(*shape, D, seg)
    q, k, v = (t.to(dtype) for t in (q, k, v))  # the exact reference sees the same rounded inputs
    to = lambda t: None if t is None else t.to(DEV)
    scale = D**-0.5
    out, lse = torch.ops.fastrlhf.causal_attention_fwd(to(q), to(k), to(v), scale, to(segment_ids))
    exact = reference.causal_attention(q.double(), k.double(), v.double(), segment_ids=segment_ids)
    own = reference.causal_attention(q, k, v, segment_ids=segment_ids)
    assert out.dtype == dtype and rel_err(out, exact) <= 2 * rel_err(own, exact)
    want = exact_lse(q.double(), k.double(), v.double(), scale, segment_ids)
    assert lse.dtype == torch.float64 and (lse.cpu() - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("D", [64, 128])
def test_attention_mma_every_short_length(dtype, D):
    """T = 1..17, both sides of the Tq >= 16 switch: out within 2x PyTorch's error, lse close."""
    for T in range(1, 18):
        q, k, v, _, segment_ids = attn_inputs(2, 4, 2, T, T, D, T % 2 == 1)
        q, k, v = (t.to(dtype) for t in (q, k, v))
        to = lambda t: None if t is None else t.to(DEV)
        out, lse = torch.ops.fastrlhf.causal_attention_fwd(to(q), to(k), to(v), D**-0.5, to(segment_ids))
        exact = reference.causal_attention(q.double(), k.double(), v.double(), segment_ids=segment_ids)
        own = reference.causal_attention(q, k, v, segment_ids=segment_ids)
        assert rel_err(out, exact) <= 2 * rel_err(own, exact), T
        want = exact_lse(q.double(), k.double(), v.double(), D**-0.5, segment_ids)
        assert (lse.cpu() - want).abs().max().item() < 1e-4, T


@pytest.mark.parametrize("dtype", HALF)
def test_attention_mma_backward_consistent(dtype):
    """The backward recomputes P from the tensor-core forward's lse: gradients stay within 2x."""
    q, k, v, dout, segment_ids = attn_inputs(2, 4, 2, 150, 150, 128, True)
    half = [t.to(dtype) for t in (q, k, v, dout)]
    to = lambda t: None if t is None else t.to(DEV)
    got = attn_run(causal_attention, *[to(t) for t in half], segment_ids=to(segment_ids))
    exact = attn_run(reference.causal_attention, *[t.double() for t in half], segment_ids=segment_ids)
    own = attn_run(reference.causal_attention, *half, segment_ids=segment_ids)
    for name, a, e, o in zip(["out", "dq", "dk", "dv"], got, exact, own):
        assert rel_err(a, e) <= 2 * rel_err(o, e), name


def test_attention_float64_refused_on_cuda():
    if DEV != "cuda":
        pytest.skip("float64 attention runs on the CPU")
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64, device=DEV)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16 on CUDA"):
        causal_attention(q, q, q)


def test_opcheck_on_device():
    q = torch.randn(1, 2, 9, 16, device=DEV, requires_grad=True)
    torch.library.opcheck(torch.ops.fastrlhf.causal_attention_fwd.default, (q, q, q, 0.25, None))
    r = torch.randn(2, 5, device=DEV)
    torch.library.opcheck(
        torch.ops.fastrlhf.gae.default, (r, r, torch.ones(2, 5, dtype=torch.bool, device=DEV), 1.0, 0.9)
    )


# ---- causal_attention forward for Tq < 16: the split-KV decode kernel ---------------------------------------
def attn_fwd_exact(q, k, v, segment_ids):
    """float64 out and lse (natural log) of the contract, on the inputs as given (rounded, for half)."""
    G = q.shape[1] // k.shape[1]
    kk, vv = (t.double().cpu().repeat_interleave(G, dim=1) for t in (k, v))  # (B, H, Tk, D)
    scores = q.double().cpu() @ kk.transpose(-1, -2) * q.shape[-1] ** -0.5  # (B, H, Tq, Tk)
    seg = None if segment_ids is None else segment_ids.cpu()
    allowed = reference.attention_mask(q.shape[2], k.shape[2], seg, torch.device("cpu"))
    scores = scores.masked_fill(~(allowed[:, None] if allowed.dim() == 3 else allowed), float("-inf"))
    return torch.softmax(scores, dim=-1) @ vv, torch.logsumexp(scores, dim=-1)


def decode_check(B, H, Hkv, Tq, Tk, D, dtype, seg):
    q, k, v, _, segment_ids = attn_inputs(B, H, Hkv, Tq, Tk, D, seg)
    to = lambda t: None if t is None else t.to(DEV)
    qh, kh, vh = (t.to(dtype) for t in (q, k, v))
    out, lse = torch.ops.fastrlhf.causal_attention_fwd(to(qh), to(kh), to(vh), D**-0.5, to(segment_ids))
    exact, _ = attn_fwd_exact(q, k, v, segment_ids)
    assert out.dtype == dtype and lse.dtype == torch.float64 and lse.shape == (B, H, Tq)
    assert torch.isfinite(out.float()).all()
    if dtype == torch.float32:
        assert rel_err(out, exact) < 1e-5
    else:  # within twice PyTorch's own error in this dtype
        own = reference.causal_attention(qh, kh, vh, segment_ids=segment_ids)
        assert rel_err(out, exact) <= 2 * rel_err(own, exact)
    # lse must match out (the backward recomputes P from it): exact on the same rounded inputs
    torch.testing.assert_close(lse.cpu(), attn_fwd_exact(qh, kh, vh, segment_ids)[1], atol=1e-4, rtol=1e-5)


DECODE_SHAPES = [  # B, H, Hkv, Tq, Tk, D
    (3, 8, 8, 1, 1, 128),  # Tk = 1
    (2, 8, 2, 1, 3000, 128),  # GQA 4, long
    (1, 32, 4, 1, 777, 64),  # GQA 8: 8 rows per block
    (2, 6, 3, 3, 40, 59),  # odd D: element loads
    (1, 4, 1, 15, 15, 256),  # Tq = Tk = 15: 60 rows, 8 row groups
    (2, 2, 2, 7, 1000, 256),  # fp32: two 16-byte loads per lane
    (1, 3, 1, 2, 517, 8),  # D = 8: one or two lanes per key
    (1, 1, 1, 1, 2999, 1),  # D = 1
    (2, 12, 4, 5, 301, 96),  # 12 loads per row -> 16 lanes, 4 idle
]


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=str)
@pytest.mark.parametrize("seg", [False, True])
def test_attention_decode_matches_reference(shape, dtype, seg):
    decode_check(*shape, dtype, seg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_decode_every_tq(dtype):
    gen = torch.Generator().manual_seed(7)
    for Tq in range(1, 16):
        Hkv = int(torch.randint(1, 4, (1,), generator=gen))
        G = int(torch.randint(1, 5, (1,), generator=gen))
        Tk = int(torch.randint(Tq, 3001, (1,), generator=gen))
        D = int(torch.randint(1, 257, (1,), generator=gen))
        decode_check(2, Hkv * G, Hkv, Tq, Tk, D, dtype, Tq % 2 == 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_decode_reads_cache_view_in_place(dtype):
    B, H, Hkv, Tq, Tk, max_len, D = 2, 8, 2, 1, 2000, 2048, 128
    q = torch.randn(B, H, Tq, D, device=DEV, dtype=dtype)
    cache_k, cache_v = torch.randn(2, B, Hkv, max_len, D, device=DEV, dtype=dtype)  # junk past Tk
    k, v = cache_k[:, :, :Tk], cache_v[:, :, :Tk]  # (B, Hkv, Tk, D) views, planes max_len * D apart
    seg = torch.ones(B, Tk, dtype=torch.long, device=DEV)
    seg[0, : Tk // 3] = 0  # a left-padded row
    fwd = torch.ops.fastrlhf.causal_attention_fwd.default
    if DEV == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    out, lse = fwd(q, k, v, D**-0.5, seg)
    if DEV == "cuda":  # no copy of k and v (twice this): the peak grows by out, lse and the workspace
        assert torch.cuda.max_memory_allocated() - before < k.numel() * k.element_size()
    want, want_lse = fwd(q, k.contiguous(), v.contiguous(), D**-0.5, seg)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    exact, _ = attn_fwd_exact(q, k, v, seg)
    assert rel_err(out, exact) < (1e-5 if dtype == torch.float32 else 1e-2)


# ---- rms_norm, swiglu, rope (the Llama family's elementwise ops) --------------------------------------
def outputs_and_grads(fn, tensors, dys):
    """fn's outputs and the gradients of its tensor inputs for upstream dys, all on the CPU in float64."""
    xs = [t.detach().requires_grad_() for t in tensors]
    outs = fn(*xs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(list(outs), list(dys))
    return [t.detach().double().cpu() for t in (*outs, *(x.grad for x in xs))]


def check_elementwise(ours, torch_own, exact, tensors, dys, dtype):
    """float64: equal to the reference within rounding; other dtypes: within twice torch's own error."""
    got = outputs_and_grads(ours, [t.to(DEV, dtype) for t in tensors], [d.to(DEV, dtype) for d in dys])
    want = outputs_and_grads(exact, tensors, dys)
    if dtype == torch.float64:
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
        return
    own = outputs_and_grads(torch_own, [t.to(dtype) for t in tensors], [d.to(dtype) for d in dys])
    for g, o, w in zip(got, own, want):
        assert rel_err(g, w) <= max(2 * rel_err(o, w), 1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, *HALF])
@pytest.mark.parametrize("shape", [(97, 59), (3, 64, 576), (1, 4096)], ids=str)
def test_rms_norm_matches_reference(shape, dtype):
    x, dy = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    w = 1 + 0.3 * torch.randn(shape[-1], dtype=torch.float64)
    x, w, dy = (t.to(dtype).double() for t in (x, w, dy))
    check_elementwise(
        lambda a, b: rms_norm(a, b, 1e-5),
        lambda a, b: reference.hf_rms_norm(a, b, 1e-5),
        lambda a, b: reference.rms_norm(a, b, 1e-5),
        [x, w],
        [dy],
        dtype,
    )


@pytest.mark.parametrize("dtype", HALF)
def test_rms_norm_fp32_weight(dtype):
    x, w = torch.randn(5, 97, 64, device=DEV, dtype=dtype), torch.randn(64, device=DEV, requires_grad=True)
    y = rms_norm(x, w, 1e-5)
    y.sum().backward()
    assert y.dtype == dtype and w.grad.dtype == torch.float32
    want = reference.rms_norm(x.double().cpu(), w.detach().double().cpu(), 1e-5)
    assert rel_err(y, want) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, *HALF])
def test_swiglu_matches_reference(dtype):
    n = 3 * 65536 + 5
    g = torch.cat(
        [
            torch.randn(n // 2, dtype=torch.float64) * 3,
            torch.linspace(-20, 20, n - n // 2, dtype=torch.float64),
        ]
    )
    u, dy = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    g, u, dy = (t.to(dtype).double() for t in (g, u, dy))
    check_elementwise(swiglu, reference.hf_swiglu, reference.swiglu, [g, u], [dy], dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, *HALF])
@pytest.mark.parametrize("shape", [(2, 97, 9, 3, 64), (1, 33, 4, 1, 80), (3, 1, 2, 2, 128)], ids=str)
def test_rope_matches_reference(shape, dtype):
    B, T, H, Hkv, D = shape
    q, k = torch.randn(B, T, H, D, dtype=torch.float64), torch.randn(B, T, Hkv, D, dtype=torch.float64)
    dq, dk = torch.randn(B, H, T, D, dtype=torch.float64), torch.randn(B, Hkv, T, D, dtype=torch.float64)
    q, k, dq, dk = (t.to(dtype).double() for t in (q, k, dq, dk))
    pos = torch.randint(0, 100000, (B, T))
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D))

    def ours(a, b):
        return rope(a, b, pos.to(a.device), inv.to(a.device))

    check_elementwise(
        ours,
        lambda a, b: reference.hf_rope(a, b, pos, inv),
        lambda a, b: (reference.rope(a, pos, inv), reference.rope(b, pos, inv)),
        [q, k],
        [dq, dk],
        dtype,
    )
