"""Property-based fuzzing of every op against its pure-PyTorch reference (issue 22).

Shapes include 0- and 1-sized dims where an op's contract allows them (elsewhere a ValueError that names
the argument must come), all float dtypes, non-contiguous views, parameters at their bounds and extreme
finite values. Tolerances follow the house rule: float64 to rounding; other dtypes within twice PyTorch's
own error in that dtype (the reference run in the input's dtype, against the reference in float64), plus
a few ulps. derandomize=True: every run draws the same examples, so a failure reproduces; the budget is
~30 s for the file on 2 cores.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from fastrlhf.ops import (
    causal_attention,
    gae,
    gelu,
    linear,
    linear_cross_entropy,
    policy_loss,
    ppo_loss,
    reference,
    rms_norm,
    rope,
    rows_linear,
    sample,
    swiglu,
    token_logprobs,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
HUGE = {torch.float64: 1e300, torch.float32: 1e37, torch.bfloat16: 1e37, torch.float16: 6e4}


def randn(seed: int, shape, scale: float, dtype: torch.dtype, contiguous: bool = True) -> torch.Tensor:
    """A seeded (shape) normal tensor times scale, clamped to dtype's range; contiguous=False returns an
    equal-valued view whose last dim has stride 2 (a fresh tensor per call)."""
    g = torch.Generator().manual_seed(seed)
    full = (*shape[:-1], 2 * shape[-1]) if shape and not contiguous else tuple(shape)
    x = torch.randn(full, generator=g, dtype=torch.float64) * scale
    big = float(torch.finfo(dtype).max) / 4
    x = x.clamp(-big, big).to(dtype)
    return x[..., ::2] if shape and not contiguous else x


def scales(dtype: torch.dtype):
    """Magnitudes from tiny to the edge of dtype's range."""
    return st.sampled_from([1e-3, 1.0, 30.0, 1e4, HUGE[dtype]])


def assert_twice_torch(ours, ref_low, ref64, name, ulps=4.0, mag=None):
    """|ours - ref64| <= 2 |ref_low - ref64| + ulps * eps * (1 + mag), elementwise, with mag = |ref64| unless
    given (a sum's rounding scales with the sum of its |terms|, not with the result); NaN only where ref64
    is NaN, infinities equal."""
    dt = ours.dtype
    eps = torch.finfo(dt).eps if dt.is_floating_point else 0.0
    ours, ref_low, ref64 = ours.detach().double(), ref_low.detach().double(), ref64.detach()
    mag = ref64.abs() if mag is None else mag.detach().double().abs()
    assert ours.shape == ref64.shape, (name, ours.shape, ref64.shape)
    nan = torch.isnan(ref64)
    assert torch.equal(torch.isnan(ours), nan), (name, ours, ref64)
    inf = torch.isinf(ref64)
    assert torch.equal(ours[inf], ref64[inf]), (name, ours, ref64)
    if dt != torch.float64 and dt.is_floating_point:  # beyond the dtype's range, inf is the right answer
        over = ~inf & (ref64.abs() > torch.finfo(dt).max)
        assert torch.equal(ours[over], ref64[over].sign() * math.inf), (name, ours[over], ref64[over])
        inf = inf | over
    ok = ~(nan | inf)
    err = (ours - ref64).abs()[ok]
    tol = 2 * (ref_low - ref64).abs().nan_to_num(0.0, 0.0, 0.0)[ok] + ulps * eps * (1 + mag[ok])
    bad = err > tol
    assert not bad.any(), (
        f"{name}: max excess {float((err - tol).max())} (err {err[bad][:4]}, tol {tol[bad][:4]})"
    )


# ---- gae -----------------------------------------------------------------------------------------
@FUZZ
@given(
    B=st.integers(0, 4), T=st.integers(0, 40), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31),
    gamma=st.one_of(st.sampled_from([0.0, 1.0, -0.1, 1.5]), st.floats(0, 1)),
    lam=st.one_of(st.sampled_from([0.0, 1.0, 2.0]), st.floats(0, 1)),
    density=st.sampled_from([0.0, 0.5, 1.0]), contiguous=st.booleans(), data=st.data(),
)  # fmt: skip
def test_fuzz_gae(B, T, dtype, seed, gamma, lam, density, contiguous, data):
    scale = data.draw(scales(dtype)) / max(T, 1)  # sums of T terms stay in range
    r = randn(seed, (B, T), scale, dtype, contiguous)
    v = randn(seed + 1, (B, T), scale, dtype, contiguous)
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) < density
    if not (0 <= gamma <= 1 and 0 <= lam <= 1):
        with pytest.raises(ValueError, match="gamma must be in" if not 0 <= gamma <= 1 else "lam must be in"):
            gae(r, v, mask, gamma=gamma, lam=lam)
        return
    adv, ret = gae(r, v, mask, gamma=gamma, lam=lam)
    want = reference.gae(r.double(), v.double(), mask, gamma=gamma, lam=lam)
    low = reference.gae(r, v, mask, gamma=gamma, lam=lam)
    for name, o, lo, w in zip(("advantages", "returns"), (adv, ret), low, want):
        assert o.dtype == dtype
        # the reference's own low-precision loop accumulates the same T roundings as the kernel
        assert_twice_torch(o, lo, w, name, ulps=8 * (T + 1))


# ---- token_logprobs ---------------------------------------------------------------------------------
@FUZZ
@given(
    lead=st.lists(st.integers(0, 4), min_size=0, max_size=3), V=st.one_of(st.integers(0, 70), st.just(2100)),
    dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31), entropy=st.booleans(),
    temperature=st.sampled_from([1.0, 0.05, 0.7, 20.0, 0.0, -1.0]), layout=st.sampled_from(["c", "last", "lead"]),
    banned=st.sampled_from([0.0, 0.3]), data=st.data(),
)  # fmt: skip
def test_fuzz_token_logprobs(lead, V, dtype, seed, entropy, temperature, layout, banned, data):
    scale = data.draw(scales(dtype))
    shape = (*lead, V)
    x = randn(seed, shape if layout != "lead" or not lead else (*lead[:-1], lead[-1] + 1, V), scale, dtype,
              contiguous=layout != "last")  # fmt: skip
    if layout == "lead" and lead:
        x = x[..., :-1, :]  # logits[:, :-1]: strided leading dims
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, max(V, 1), tuple(lead), generator=g)
    if V == 0 or temperature <= 0:
        with pytest.raises(ValueError, match="V >= 1" if V == 0 else "temperature must be > 0"):
            token_logprobs(x, t, temperature=temperature, return_entropy=entropy)
        return
    if banned:  # -inf logits (a padded vocabulary), never the target's, so every row keeps a finite one
        ban = torch.rand(shape, generator=g) < banned
        ban.scatter_(-1, t[..., None], False)
        x = x.masked_fill(ban, float("-inf"))
    x = x.requires_grad_(dtype in (torch.float32, torch.float64))
    out = token_logprobs(x, t, temperature=temperature, return_entropy=True)
    lp, h = out
    assert lp.dtype == dtype and lp.shape == tuple(lead)
    assert torch.isfinite(lp).all() and (lp <= 0).all(), lp
    assert torch.isfinite(h).all() and (h >= 0).all(), h
    want = reference.token_logprobs(x.detach().double(), t, temperature=temperature, return_entropy=True)
    low = reference.token_logprobs(x.detach(), t, temperature=temperature, return_entropy=True)
    ulps = 8 * (1 + math.sqrt(V))  # sum e^d over V terms
    assert_twice_torch(lp, low[0], want[0], "logprobs", ulps)
    assert_twice_torch(h, low[1], want[1], "entropy", ulps)
    if x.requires_grad and x.numel():
        g_lp, g_h = (
            torch.randn(lp.shape, generator=g, dtype=dtype),
            torch.randn(lp.shape, generator=g, dtype=dtype),
        )
        d = torch.autograd.grad(out, x, (g_lp, g_h if entropy else torch.zeros_like(g_h)))[0]
        x64 = x.detach().double().requires_grad_()
        r = reference.token_logprobs(x64, t, temperature=temperature, return_entropy=True)
        d64 = torch.autograd.grad(
            r, x64, (g_lp.double(), g_h.double() if entropy else torch.zeros_like(r[1]))
        )[0]
        xl = x.detach().clone().requires_grad_()
        rl = reference.token_logprobs(xl, t, temperature=temperature, return_entropy=True)
        dl = torch.autograd.grad(rl, xl, (g_lp, g_h if entropy else torch.zeros_like(g_h)))[0]
        g_max = float(g_h.abs().max()) if entropy else 0.0
        assert_twice_torch(d, dl, d64, "d logits", ulps=ulps * (2 + g_max))


# ---- ppo_loss -----------------------------------------------------------------------------------------
@FUZZ
@given(
    B=st.integers(0, 3), T=st.integers(0, 30), dtype=st.sampled_from(DTYPES[:3]), seed=st.integers(0, 2**31),
    weights=st.booleans(), with_entropy=st.booleans(), contiguous=st.booleans(),
    clip=st.sampled_from([1e-6, 0.2, 1.0, 0.0]), clip_v=st.sampled_from([1e-6, 0.2, 10.0, -1.0]),
    vf_coef=st.sampled_from([0.0, 0.1, 2.0]), ent_coef=st.sampled_from([0.0, 0.01, -0.5]),
    lp_scale=st.sampled_from([1e-3, 1.0, 30.0]), v_scale=st.sampled_from([1e-3, 1.0, 1e4, 1e15]),
)  # fmt: skip
def test_fuzz_ppo_loss(B, T, dtype, seed, weights, with_entropy, contiguous, clip, clip_v, vf_coef, ent_coef,
                       lp_scale, v_scale):  # fmt: skip
    if dtype != torch.float64:
        v_scale = min(v_scale, 1e15)  # (v - ret)^2 stays in float32
    lp = -randn(seed, (B, T), lp_scale, dtype, contiguous).abs()  # log-probs <= 0; |log ratio| <= ~5 lp_scale
    old = -randn(seed + 1, (B, T), lp_scale, dtype, contiguous).abs()
    adv = randn(seed + 2, (B, T), 1.0, dtype, contiguous)
    val, old_val, ret = (randn(seed + k, (B, T), v_scale, dtype, contiguous) for k in (3, 4, 5))
    ent = randn(seed + 6, (B, T), 1.0, dtype, contiguous).abs() if with_entropy else None
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) < 0.7
    mask = (mask * torch.rand(B, T, generator=g)).to(dtype) if weights else mask
    kw = {"clip_range": clip, "clip_range_value": clip_v, "vf_coef": vf_coef, "ent_coef": ent_coef}
    bad = [(n, v) for n, v, ok in (("clip_range", clip, clip > 0), ("clip_range_value", clip_v, clip_v > 0),
                                   ("ent_coef", ent_coef, ent_coef >= 0)) if not ok]  # fmt: skip
    if bad:
        with pytest.raises(ValueError, match=f"{bad[0][0]} must be"):
            ppo_loss(lp, old, adv, val, old_val, ret, mask, entropy=ent, **kw)
        return
    diff = [t.detach().clone().requires_grad_() for t in (lp, val, *([ent] if with_entropy else []))]
    loss, stats = ppo_loss(
        diff[0], old, adv, diff[1], old_val, ret, mask, entropy=diff[2] if with_entropy else None, **kw
    )
    grads = torch.autograd.grad(loss, diff) if loss.requires_grad else None
    as64 = lambda t: None if t is None else t.detach().double()
    d64 = [t.detach().double().requires_grad_() for t in diff]
    loss64, stats64 = reference.ppo_loss(d64[0], as64(old), as64(adv), d64[1], as64(old_val), as64(ret),
                                         mask.double() if weights else mask, entropy=d64[2] if with_entropy else None, **kw)  # fmt: skip
    dl = [t.detach().clone().requires_grad_() for t in diff]
    loss_l, stats_l = reference.ppo_loss(
        dl[0], old, adv, dl[1], old_val, ret, mask, entropy=dl[2] if with_entropy else None, **kw
    )
    ulps = 16 * (B * T + 1)
    assert_twice_torch(loss, loss_l, loss64.detach(), "loss", ulps)
    # The clip fractions count strict comparisons: a token whose two losses tie up to rounding (e.g. value
    # clipping inactive, old + (v - old) vs v) may count either way, so each such token is allowed to flip.
    m = mask.double()
    n = m.sum().clamp(min=1)
    lr = lp.double() - old.double()
    pg1, pg2 = -adv.double() * lr.exp(), -adv.double() * lr.exp().clamp(1 - clip, 1 + clip)
    v64, ov64, r64 = val.double(), old_val.double(), ret.double()
    vf1, vf2 = (v64 - r64) ** 2, (ov64 + (v64 - ov64).clamp(-clip_v, clip_v) - r64) ** 2
    near = lambda a, b: ((a - b).abs() <= 1e-5 * (a.abs() + b.abs()) + 1e-300).double()
    slack = {"clipfrac": (near(pg1, pg2) * m).sum() / n, "vf_clipfrac": (near(vf1, vf2) * m).sum() / n}
    for name in stats:
        if name in slack:
            assert float((stats[name].double() - stats64[name]).abs()) <= float(slack[name]) + 1e-6, name
        else:
            assert_twice_torch(stats[name], stats_l[name], stats64[name], name, ulps)
    if grads is not None:
        g64 = torch.autograd.grad(loss64, d64)
        gl = torch.autograd.grad(loss_l, dl)
        for name, a, lo, w in zip(("d logprobs", "d values", "d entropy"), grads, gl, g64):
            assert_twice_torch(a, lo, w, name, ulps)


# ---- causal_attention ----------------------------------------------------------------------------------
@FUZZ
@given(
    B=st.integers(0, 2), Hkv=st.integers(1, 2), group=st.integers(1, 3), Tq=st.integers(0, 9),
    extra=st.integers(0, 9), D=st.sampled_from([1, 3, 16, 59, 64]), dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31), scale=st.sampled_from([None, 1e-3, 0.7, 8.0, float("nan"), 0.0, -0.5]),
    segments=st.booleans(), layout=st.sampled_from(["c", "bthd", "cache"]), mag=st.sampled_from([1e-3, 1.0, 4.0]),
)  # fmt: skip
def test_fuzz_causal_attention(B, Hkv, group, Tq, extra, D, dtype, seed, scale, segments, layout, mag):
    H, Tk = Hkv * group, Tq + extra
    if layout == "bthd":  # (B, T, H, D) transposed: the layout a model's projections give
        q = randn(seed, (B, Tq, H, D), mag, dtype).transpose(1, 2)
        k, v = (randn(seed + i, (B, Tk, Hkv, D), mag, dtype).transpose(1, 2) for i in (1, 2))
    else:
        q = randn(seed, (B, H, Tq, D), mag, dtype)
        cap = Tk + 3 if layout == "cache" else Tk  # a KV-cache buffer's first Tk positions
        k, v = (randn(seed + i, (B, Hkv, cap, D), mag, dtype)[:, :, :Tk] for i in (1, 2))
    g = torch.Generator().manual_seed(seed)
    seg = torch.randint(0, 3, (B, Tk), generator=g).sort(dim=1).values.int() if segments else None
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        with pytest.raises(ValueError, match="scale must be finite and > 0"):
            causal_attention(q, k, v, scale=scale, segment_ids=seg)
        return
    grad = dtype in (torch.float32, torch.float64)
    qkv = [t.detach().clone().requires_grad_(grad) for t in (q, k, v)]
    out = causal_attention(*qkv, scale=scale, segment_ids=seg)
    want = reference.causal_attention(*(t.detach().double() for t in qkv), scale=scale, segment_ids=seg)
    low = reference.causal_attention(*(t.detach() for t in qkv), scale=scale, segment_ids=seg)
    assert out.dtype == dtype and out.shape == (B, H, Tq, D)
    assert_twice_torch(out, low, want, "out", ulps=8 * (Tk + D))
    if grad and out.numel():
        dout = randn(seed + 3, (B, H, Tq, D), 1.0, dtype)
        d = torch.autograd.grad(out, qkv, dout)
        q64 = [t.detach().double().requires_grad_() for t in qkv]
        d64 = torch.autograd.grad(
            reference.causal_attention(*q64, scale=scale, segment_ids=seg), q64, dout.double()
        )
        ql = [t.detach().clone().requires_grad_() for t in qkv]
        dl = torch.autograd.grad(reference.causal_attention(*ql, scale=scale, segment_ids=seg), ql, dout)
        for name, a, lo, w in zip(("dq", "dk", "dv"), d, dl, d64):
            assert_twice_torch(a, lo, w, name, ulps=32 * (Tk + D) * (1 + mag * mag * D * (scale or D**-0.5)))


# ---- sample -------------------------------------------------------------------------------------------
@FUZZ
@given(
    B=st.integers(0, 4), V=st.integers(0, 300), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31),
    temperature=st.sampled_from([1.0, 0.0, 1e-3, 0.7, 5.0, -0.5]), top_k=st.sampled_from([0, 1, 5, 1000, -1]),
    top_p=st.sampled_from([1.0, 1e-6, 0.5, 0.9, 0.0]), min_p=st.sampled_from([0.0, 0.05, 1.0, 1.5]),
    banned=st.sampled_from([0.0, 0.5]), data=st.data(),
)  # fmt: skip
def test_fuzz_sample(B, V, dtype, seed, temperature, top_k, top_p, min_p, banned, data):
    x = randn(seed, (B, V), data.draw(scales(dtype)), dtype)
    g = torch.Generator().manual_seed(seed)
    if banned and V > 1:  # -inf logits ban tokens; every row keeps its first one
        ban = torch.rand(B, V, generator=g) < banned
        ban[:, 0] = False
        x = x.masked_fill(ban, float("-inf"))
    kw = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p}
    bad = next((n for n, ok in (("logits must have at least one column", V >= 1), ("temperature must be", temperature >= 0),
                                ("top_k must be", top_k >= 0), ("top_p must be", 0 < top_p <= 1),
                                ("min_p must be", 0 <= min_p <= 1)) if not ok), None)  # fmt: skip
    if bad and (B > 0 or V == 0):  # per-row parameters are only read for the rows there are
        with pytest.raises(ValueError, match=bad):
            sample(x, **kw, generator=g)
        return
    tokens, logprobs = sample(x, **kw, generator=g)
    assert tokens.shape == logprobs.shape == (B,) and logprobs.dtype == torch.float32
    if B == 0:
        return
    x64 = x.double()
    allowed = reference.sample_filter(x64, **kw) > float("-inf")  # (B, V)
    assert allowed.gather(1, tokens[:, None]).all(), (tokens, allowed)
    T = temperature if temperature > 0 else 1.0
    want = torch.log_softmax(x64 / T, 1).gather(1, tokens[:, None])[:, 0]
    finite_max = x64.masked_fill(torch.isinf(x64), 0).abs().amax(1)  # the kernel's fp32 math, relative to it
    tol = 4e-6 * (1 + want.abs() + finite_max / T)
    assert ((logprobs.double() - want).abs() <= tol).all(), (logprobs, want)


# ---- linear_cross_entropy --------------------------------------------------------------------------------
@FUZZ
@given(
    N=st.integers(0, 20), C=st.integers(1, 12), V=st.integers(1, 40), dtype=st.sampled_from(DTYPES[:3]),
    seed=st.integers(0, 2**31), chunk=st.integers(1, 8), ignored=st.sampled_from([0.0, 0.3, 1.0]),
    scale=st.sampled_from([1e-3, 1.0, 1e4, 1e10]), contiguous=st.booleans(),
)  # fmt: skip
def test_fuzz_linear_cross_entropy(N, C, V, dtype, seed, chunk, ignored, scale, contiguous):
    h = randn(seed, (N, C), scale, dtype, contiguous)
    w = randn(seed + 1, (V, C), 1.0, dtype)
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, V, (N,), generator=g).masked_fill(torch.rand(N, generator=g) < ignored, -100)
    hw = [h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()]
    loss = linear_cross_entropy(*hw, t, chunk_rows=chunk)
    d = torch.autograd.grad(loss, hw, allow_unused=True)
    h64, w64 = (a.detach().double().requires_grad_() for a in hw)
    loss64 = reference.linear_cross_entropy(h64, w64, t)
    d64 = torch.autograd.grad(loss64, (h64, w64), allow_unused=True)
    hl, wl = (a.detach().clone().requires_grad_() for a in hw)
    if dtype == torch.bfloat16:  # PyTorch's own bf16 cross-entropy (the reference computes in float32)
        loss_l = F.cross_entropy(hl @ wl.t(), t, ignore_index=-100)
    else:
        loss_l = reference.linear_cross_entropy(hl, wl, t)
    dl = torch.autograd.grad(loss_l, (hl, wl), allow_unused=True)
    ulps = 16 * C * (N + V)
    assert_twice_torch(loss, loss_l, loss64.detach(), "loss", ulps)
    for name, a, lo, w_ in zip(("d hidden", "d weight"), d, dl, d64):
        assert_twice_torch(a, lo, w_, name, ulps)


# ---- linear / rows_linear ----------------------------------------------------------------------------------
@FUZZ
@given(
    lead=st.lists(st.integers(0, 5), min_size=1, max_size=2), N=st.sampled_from([0, 1, 7, 128, 129]),
    K=st.integers(0, 70), M=st.integers(1, 40), bias=st.booleans(), seed=st.integers(0, 2**31),
    contiguous=st.booleans(), scale=st.sampled_from([1e-3, 1.0, 1e15]),
)  # fmt: skip
def test_fuzz_linear(lead, N, K, M, bias, seed, contiguous, scale):
    x = randn(seed, (N, K), scale, torch.float32, contiguous)
    w = randn(seed + 1, (M, K), 1.0, torch.float32)
    b = randn(seed + 2, (M,), scale, torch.float32) if bias else None
    b64 = None if b is None else b.double()
    want = F.linear(x.double(), w.double(), b64)
    mag = F.linear(x.double().abs(), w.double().abs(), None if b is None else b64.abs())
    ulps = 8 * (K + 1)
    assert_twice_torch(rows_linear(x, w, b), F.linear(x, w, b), want, "rows_linear", ulps, mag)
    xl = randn(seed, (*lead, K), scale, torch.float32, contiguous)
    want = F.linear(xl.double(), w.double(), b64)
    mag = F.linear(xl.double().abs(), w.double().abs(), None if b is None else b64.abs())
    assert_twice_torch(linear(xl, w, b), F.linear(xl, w, b), want, "linear", ulps, mag)
    with pytest.raises(ValueError, match="weight must be \\(M, K\\) with K ="):
        rows_linear(x, randn(seed, (M, K + 1), 1.0, torch.float32), b)


# ---- gelu -----------------------------------------------------------------------------------------------
@FUZZ
@given(
    shape=st.lists(st.integers(0, 40), min_size=0, max_size=3), dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31), contiguous=st.booleans(), data=st.data(),
)  # fmt: skip
def test_fuzz_gelu(shape, dtype, seed, contiguous, data):
    x = randn(seed, tuple(shape), data.draw(scales(dtype)), dtype, contiguous).requires_grad_()
    y = gelu(x)
    want = reference.gelu(x.detach().double())
    assert y.dtype == dtype and y.shape == x.shape
    assert_twice_torch(y, reference.gelu(x.detach()), want, "gelu")
    dy = randn(seed + 1, tuple(shape), 1.0, dtype)
    (dx,) = torch.autograd.grad(y, x, dy)
    x64 = x.detach().double().requires_grad_()
    (d64,) = torch.autograd.grad(reference.gelu(x64), x64, dy.double())
    xl = x.detach().clone().requires_grad_()
    (dl,) = torch.autograd.grad(reference.gelu(xl), xl, dy)
    assert_twice_torch(dx, dl, d64, "d gelu", ulps=64)  # float64: the formula differs from autograd's


def grads_three_ways(fn_ours, fn_ref, inputs, dy):
    """d(sum dy * f)/d inputs from ours, the reference in the inputs' dtype and the reference in float64."""
    out = []
    for fn, cast in ((fn_ours, None), (fn_ref, None), (fn_ref, torch.float64)):
        xs = [(x.detach().to(cast) if cast else x.detach().clone()).requires_grad_() for x in inputs]
        y = fn(*xs)
        out.append(torch.autograd.grad(y, xs, dy.to(y.dtype)))
    return out


# ---- rms_norm -------------------------------------------------------------------------------------------
@FUZZ
@given(
    lead=st.lists(st.integers(0, 6), min_size=0, max_size=2), C=st.integers(1, 70), dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31), eps=st.sampled_from([1e-6, 1e-5, 0.0, 1.0]), contiguous=st.booleans(),
    mag=st.sampled_from([1e-3, 1.0, 30.0, 1e4]),
)  # fmt: skip
def test_fuzz_rms_norm(lead, C, dtype, seed, eps, contiguous, mag):
    x = randn(seed, (*lead, C), mag, dtype, contiguous)
    w = randn(seed + 1, (C,), 1.0, dtype)
    if eps == 0.0:
        x = x + torch.where(x >= 0, 1e-2, -1e-2).to(dtype)  # eps 0 needs a row that is not all zeros
    want = reference.rms_norm(x.double(), w.double(), eps)
    y = rms_norm(x, w, eps)
    assert y.dtype == dtype and y.shape == x.shape
    assert_twice_torch(y, reference.rms_norm(x, w, eps), want, "rms_norm")
    dy = randn(seed + 2, x.shape, 1.0, dtype)
    ours, low, d64 = grads_three_ways(
        lambda a, b: rms_norm(a, b, eps), lambda a, b: reference.rms_norm(a, b, eps), [x, w], dy
    )
    # dw sums over every row: its rounding scales with the sum of |dy x r| (mag), not with the result
    dw_mag = (
        dy.double() * reference.rms_norm(x.double(), torch.ones_like(w, dtype=torch.float64), eps)
    ).abs()
    dw_mag = dw_mag.reshape(-1, C).sum(0)
    assert_twice_torch(ours[0], low[0], d64[0], "d rms_norm / dx", ulps=64, mag=d64[0].abs() + 1)
    assert_twice_torch(ours[1], low[1], d64[1], "d rms_norm / dw", ulps=64, mag=dw_mag)


# ---- swiglu ---------------------------------------------------------------------------------------------
@FUZZ
@given(
    shape=st.lists(st.integers(0, 40), min_size=1, max_size=3), dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31), contiguous=st.booleans(), data=st.data(),
)  # fmt: skip
def test_fuzz_swiglu(shape, dtype, seed, contiguous, data):
    gate = randn(seed, tuple(shape), data.draw(scales(dtype)), dtype, contiguous)
    up = randn(seed + 1, tuple(shape), data.draw(st.sampled_from([1e-3, 1.0, 30.0])), dtype, contiguous)
    y = swiglu(gate, up)
    assert y.dtype == dtype and y.shape == gate.shape
    want = reference.swiglu(gate.double(), up.double())
    assert_twice_torch(y, reference.swiglu(gate, up), want, "swiglu")
    dy = randn(seed + 2, tuple(shape), 1.0, dtype)
    ours, low, d64 = grads_three_ways(swiglu, reference.swiglu, [gate, up], dy)
    for name, a, b, c in zip(("d gate", "d up"), ours, low, d64):
        assert_twice_torch(a, b, c, f"swiglu {name}", ulps=64)


# ---- rope -----------------------------------------------------------------------------------------------
@FUZZ
@given(
    B=st.integers(0, 3), T=st.integers(0, 12), H=st.integers(1, 4), Hkv=st.integers(0, 3),
    half=st.integers(1, 40), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31),
    batched_positions=st.booleans(), far=st.booleans(), contiguous=st.booleans(),
    mag=st.sampled_from([1e-3, 1.0, 1e4]),
)  # fmt: skip
def test_fuzz_rope(B, T, H, Hkv, half, dtype, seed, batched_positions, far, contiguous, mag):
    D = 2 * half
    q = randn(seed, (B, T, H, D), mag, dtype, contiguous)
    k = randn(seed + 1, (B, T, Hkv, D), mag, dtype, contiguous) if Hkv else None
    g = torch.Generator().manual_seed(seed)
    top = 1_000_000 if far else 4096  # positions far past any trained context still rotate exactly
    positions = torch.randint(0, top, (B, T) if batched_positions else (T,), generator=g)
    inv_freq = 10000.0 ** (-torch.arange(half, dtype=torch.float32) / half)
    yq, yk = rope(q, k, positions, inv_freq)
    for x, y, name in ((q, yq, "q"), (k, yk, "k")):
        if x is None:
            assert y is None
            continue
        assert y.dtype == dtype and y.shape == (B, x.shape[2], T, D)
        want = reference.rope(x.double(), positions, inv_freq)
        assert_twice_torch(
            y,
            reference.rope(x, positions, inv_freq),
            want,
            f"rope {name}",
            mag=x.abs().amax(-1, keepdim=True).transpose(1, 2).expand_as(want),
        )
        dy = randn(seed + 2, y.shape, 1.0, dtype)
        ours, low, d64 = grads_three_ways(
            lambda a: rope(a, None, positions, inv_freq)[0],
            lambda a: reference.rope(a, positions, inv_freq),
            [x],
            dy,
        )
        assert_twice_torch(
            ours[0],
            low[0],
            d64[0],
            f"d rope {name}",
            mag=dy.abs().amax(-1, keepdim=True).transpose(1, 2).expand_as(d64[0]),
        )


# ---- policy_loss ----------------------------------------------------------------------------------------
@FUZZ
@given(
    B=st.integers(0, 5), T=st.integers(0, 30), dtype=st.sampled_from([torch.float64, torch.float32]),
    seed=st.integers(0, 2**31), agg=st.sampled_from(reference.POLICY_AGGS), per_seq=st.booleans(),
    eps=st.sampled_from([(0.2, 0.2), (0.2, 0.28), (0.0, 0.0), (0.9, 5.0)]),
    beta=st.sampled_from([0.0, 0.04, 1.0]), with_entropy=st.booleans(), density=st.sampled_from([0.0, 0.3, 1.0]),
    drift=st.sampled_from([0.0, 1e-3, 0.5, 5.0]), contiguous=st.booleans(),
)  # fmt: skip
def test_fuzz_policy_loss(
    B, T, dtype, seed, agg, per_seq, eps, beta, with_entropy, density, drift, contiguous
):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64).mul(5).to(dtype)
    lp = old + randn(seed + 1, (B, T), drift, dtype, contiguous)
    adv = randn(seed + 2, (B,) if per_seq else (B, T), 1.0, dtype)
    mask = torch.rand(B, T, generator=g) < density
    ref = old + randn(seed + 3, (B, T), 0.3, dtype) if beta > 0 else None
    ent = torch.rand(B, T, generator=g, dtype=torch.float64).mul(3).to(dtype) if with_entropy else None
    kw = dict(eps_low=eps[0], eps_high=eps[1], agg=agg, ref_logprobs=ref, beta=beta, ent_coef=0.01)

    def run(fn, cast):
        xs = [None if x is None else x.detach().to(cast).requires_grad_() for x in (lp, ent)]
        args = {k: (v.to(cast) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        loss, stats = fn(xs[0], old.to(cast), adv.to(cast), mask, entropy=xs[1], **args)
        grads = torch.autograd.grad(loss, [x for x in xs if x is not None], allow_unused=True)
        return loss, stats, grads

    loss, stats, grads = run(policy_loss, dtype)
    loss_l, stats_l, grads_l = run(reference.policy_loss, dtype)
    loss64, stats64, grads64 = run(reference.policy_loss, torch.float64)
    assert loss.dtype == dtype and torch.isfinite(loss)
    assert_twice_torch(loss, loss_l, loss64, "policy_loss", ulps=64, mag=loss64.abs() + 1)
    for a, b, c in zip(grads, grads_l, grads64):
        assert a is not None and a.shape == (B, T)
        assert_twice_torch(a, b, c, "d policy_loss", ulps=64, mag=c.abs() + 1)
    for name in ("pg_loss", "kl", "approx_kl", "ratio_mean", "entropy"):
        assert_twice_torch(
            stats[name].to(dtype),
            stats_l[name].to(dtype),
            stats64[name],
            name,
            ulps=64,
            mag=stats64[name].abs() + 1,
        )
