import os
import subprocess
import sys

import fastrlhf
import pytest
import torch
import torch.nn.functional as F
from fastrlhf.ops import causal_attention, reference


def make(B, H, Hkv, Tq, Tk, D, dtype=torch.float32):
    q = torch.randn(B, H, Tq, D, dtype=dtype)
    k = torch.randn(B, Hkv, Tk, D, dtype=dtype)
    v = torch.randn(B, Hkv, Tk, D, dtype=dtype)
    return q, k, v


def left_padded(B, Tk):
    """Row b has b * 7 pads on the left; pads are segment 0, the text segment 1."""
    lengths = torch.clamp(Tk - 7 * torch.arange(B), min=1)  # (B,)
    return (torch.arange(Tk)[None, :] >= (Tk - lengths)[:, None]).long()  # (B, Tk)


def packed(B, Tk):
    """Each row holds a few documents of random lengths: segment ids 0, 1, 2, ... left to right."""
    starts = torch.rand(B, Tk) < 0.05
    starts[:, 0] = True
    return torch.cumsum(starts.long(), dim=1) - 1  # (B, Tk)


def out_and_grads(fn, q, k, v, dout, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def rel_err(got, want):
    """max |got - want| / max |want|: relative to the tensor's scale, not element by element. An all-zero
    want (dq when each query sees one key) is measured against the unit scale of the random inputs."""
    scale = want.double().abs().max().item() or 1.0
    return (got.double() - want.double()).abs().max().item() / scale


def test_extension_is_loaded():
    assert fastrlhf.HAS_EXT, "the tests must exercise the compiled ops, not the fallback"


SHAPES = [  # B, H, Hkv, Tq, Tk, D
    (1, 1, 1, 1, 1, 64),  # T = 1
    (2, 6, 6, 97, 97, 59),  # odd D, partial tiles
    (1, 6, 2, 97, 97, 64),
    (2, 6, 1, 97, 97, 128),
    (1, 2, 2, 70, 70, 256),
    (2, 4, 2, 65, 150, 64),  # a chunk of queries after a KV cache
    (1, 6, 1, 1, 300, 64),  # decode
    (2, 6, 2, 3, 70, 59),  # a few decode rows, odd D, a short last key tile
    (1, 2, 1, 200, 200, 64),  # several tiles in both directions
]


@pytest.mark.parametrize("B,H,Hkv,Tq,Tk,D", SHAPES)
@pytest.mark.parametrize("seg", [None, "left_padded", "packed"])
def test_float32_matches_float64_reference(B, H, Hkv, Tq, Tk, D, seg):
    q, k, v = make(B, H, Hkv, Tq, Tk, D)
    segment_ids = {None: None, "left_padded": left_padded, "packed": packed}[seg]
    segment_ids = segment_ids(B, Tk) if segment_ids else None
    dout = torch.randn(B, H, Tq, D)
    ours = out_and_grads(causal_attention, q, k, v, dout, segment_ids=segment_ids)
    want = out_and_grads(
        reference.causal_attention, q.double(), k.double(), v.double(), dout.double(), segment_ids=segment_ids
    )
    for name, a, b in zip(["out", "dq", "dk", "dv"], ours, want):
        assert a.dtype == torch.float32 and torch.isfinite(a).all()
        assert rel_err(a, b) <= 1e-5, name


@pytest.mark.parametrize("B,H,Hkv,Tq,Tk,D", [(2, 6, 2, 97, 97, 59), (1, 4, 4, 40, 130, 64)])
def test_float64_equals_reference(B, H, Hkv, Tq, Tk, D):
    q, k, v = make(B, H, Hkv, Tq, Tk, D, torch.float64)
    segment_ids = packed(B, Tk)
    dout = torch.randn(B, H, Tq, D, dtype=torch.float64)
    ours = out_and_grads(causal_attention, q, k, v, dout, segment_ids=segment_ids)
    want = out_and_grads(reference.causal_attention, q, k, v, dout, segment_ids=segment_ids)
    for a, b in zip(ours, want):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seg", [False, True])
def test_half_dtypes_within_twice_pytorch_error(dtype, seg):
    B, H, Hkv, T, D = 2, 4, 2, 97, 64
    q, k, v = make(B, H, Hkv, T, T, D)
    segment_ids = packed(B, T) if seg else None
    dout = torch.randn(B, H, T, D)
    exact = out_and_grads(
        reference.causal_attention, q.double(), k.double(), v.double(), dout.double(), segment_ids=segment_ids
    )
    half = [t.to(dtype) for t in (q, k, v, dout)]
    ours = out_and_grads(causal_attention, *half, segment_ids=segment_ids)
    # PyTorch's own error: the reference on the same half inputs (fp32 math, one rounding at the end)
    torch_own = out_and_grads(reference.causal_attention, *half, segment_ids=segment_ids)
    for name, a, p, e in zip(["out", "dq", "dk", "dv"], ours, torch_own, exact):
        assert a.dtype == dtype
        assert rel_err(a, e) <= 2 * rel_err(p, e), name


def test_half_within_twice_sdpa_error():
    B, H, T, D = 2, 4, 130, 64
    q, k, v = make(B, H, H, T, T, D)
    exact = reference.causal_attention(q.double(), k.double(), v.double())
    for dtype in (torch.bfloat16, torch.float16):
        h = [t.to(dtype) for t in (q, k, v)]
        sdpa = F.scaled_dot_product_attention(*h, is_causal=True)
        assert rel_err(causal_attention(*h), exact) <= 2 * rel_err(sdpa, exact)


def test_gradcheck_float64_with_segments_and_gqa():
    q, k, v = (t.requires_grad_() for t in make(2, 4, 2, 6, 6, 3, torch.float64))
    segment_ids = torch.tensor([[0, 0, 1, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert torch.autograd.gradcheck(
        lambda q, k, v: causal_attention(q, k, v, segment_ids=segment_ids), (q, k, v)
    )


def test_gradcheck_float64_kv_cache_and_scale():
    q, k, v = (t.requires_grad_() for t in make(1, 2, 1, 3, 7, 5, torch.float64))
    assert torch.autograd.gradcheck(lambda q, k, v: causal_attention(q, k, v, scale=0.7), (q, k, v))


# Scores of the opposite sign (a negative scale is refused since issue 22: -k gives the same scores);
# and logits of magnitude ~100, where fp32 itself loses ~1e-5 (compare PyTorch's fp32)
@pytest.mark.parametrize("scale,flip", [(0.4, True), (3.0, False)])
def test_unusual_scales_match_reference(scale, flip):
    q, k, v = make(2, 4, 2, 80, 80, 64)
    k = -k if flip else k
    segment_ids = packed(2, 80)
    dout = torch.randn(2, 4, 80, 64)
    kw = {"scale": scale, "segment_ids": segment_ids}
    ours = out_and_grads(causal_attention, q, k, v, dout, **kw)
    torch_fp32 = out_and_grads(reference.causal_attention, q, k, v, dout, **kw)
    want = out_and_grads(reference.causal_attention, q.double(), k.double(), v.double(), dout.double(), **kw)
    for name, a, t, b in zip(["out", "dq", "dk", "dv"], ours, torch_fp32, want):
        assert torch.isfinite(a).all() and rel_err(a, b) <= max(1e-5, 2 * rel_err(t, b)), name


def test_decode_with_left_pads_every_row_finite():
    B, H, Hkv, Tk, D = 4, 6, 2, 300, 64
    q, k, v = make(B, H, Hkv, 1, Tk, D)
    segment_ids = left_padded(B, Tk)
    out = causal_attention(q, k, v, segment_ids=segment_ids)
    assert torch.isfinite(out).all()
    want = reference.causal_attention(q.double(), k.double(), v.double(), segment_ids=segment_ids)
    assert rel_err(out, want) <= 1e-5


def test_pad_queries_see_only_pads():
    """A left-pad query attends within the pad segment: its output is the mean of the pad values it sees."""
    q, k, v = make(1, 1, 1, 5, 5, 4)
    q.zero_()  # uniform attention over whatever a query sees
    segment_ids = torch.tensor([[0, 0, 1, 1, 1]])
    out = causal_attention(q, k, v, segment_ids=segment_ids)
    torch.testing.assert_close(out[0, 0, 1], v[0, 0, :2].mean(0))
    torch.testing.assert_close(out[0, 0, 4], v[0, 0, 2:].mean(0))


def test_noncontiguous_inputs_and_integer_segment_dtypes():
    q, k, v = make(2, 4, 2, 33, 33, 64)
    segment_ids = packed(2, 33)
    want = causal_attention(q, k, v, segment_ids=segment_ids)
    # same values, laid out (B, T, H, D) in memory
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    assert not strided[0].is_contiguous()
    assert torch.equal(causal_attention(*strided, segment_ids=segment_ids.int()), want)
    assert torch.equal(causal_attention(q, k, v, segment_ids=segment_ids.to(torch.int16)), want)


# B * Hkv = 1 and 4: the backward picks its schedule (one or two passes) by the thread count
@pytest.mark.parametrize("Hkv", [1, 4])
def test_independent_of_thread_count(Hkv):
    q, k, v = make(1, 4, Hkv, 150, 150, 59)
    dout = torch.randn(1, 4, 150, 59)
    segment_ids = packed(1, 150)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = out_and_grads(causal_attention, q, k, v, dout, segment_ids=segment_ids)
        torch.set_num_threads(2)
        two = out_and_grads(causal_attention, q, k, v, dout, segment_ids=segment_ids)
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_opcheck():
    q, k, v = make(2, 4, 2, 9, 12, 8)
    segment_ids = packed(2, 12)
    torch.library.opcheck(torch.ops.fastrlhf.causal_attention_fwd.default, (q, k, v, 0.3, None))
    torch.library.opcheck(torch.ops.fastrlhf.causal_attention_fwd.default, (q, k, v, 0.3, segment_ids))
    out, lse = torch.ops.fastrlhf.causal_attention_fwd(q, k, v, 0.3, segment_ids)
    torch.library.opcheck(
        torch.ops.fastrlhf.causal_attention_bwd.default,
        (torch.randn_like(out), q, k, v, out, lse, 0.3, segment_ids),
    )


def test_compile_fullgraph_forward_and_backward():
    q, k, v = make(2, 4, 2, 20, 20, 16)
    segment_ids = packed(2, 20)
    dout = torch.randn(2, 4, 20, 16)
    f = torch.compile(
        lambda q, k, v: causal_attention(q, k, v, segment_ids=segment_ids),
        fullgraph=True,
        backend="aot_eager",
    )
    got = out_and_grads(f, q, k, v, dout)
    want = out_and_grads(causal_attention, q, k, v, dout, segment_ids=segment_ids)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_baseline_cpu_path_matches_reference():
    """The non-AVX2 build of the kernels (FASTRLHF_CPU_PATH=base, chosen once per process)."""
    script = (
        "import torch, fastrlhf\n"
        "from fastrlhf.ops import causal_attention, reference\n"
        "assert fastrlhf.build_info()['cpu_path'] == 'base'\n"
        "torch.manual_seed(0)\n"
        "seg = torch.tensor([[0] * 30 + [1] * 40, [2] * 70])\n"
        "for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10), (torch.bfloat16, 1e-2)):\n"
        "    x = [torch.randn(2, 4, 70, 59).to(dtype).requires_grad_() for _ in range(3)]\n"
        "    r = [t.detach().double().requires_grad_() for t in x]\n"
        "    out = causal_attention(*x, segment_ids=seg)\n"
        "    ref = reference.causal_attention(*r, segment_ids=seg)\n"
        "    got = (out, *torch.autograd.grad(out, x, torch.ones_like(out)))\n"
        "    want = (ref, *torch.autograd.grad(ref, r, torch.ones_like(ref)))\n"
        "    for a, b in zip(got, want):\n"
        "        err = ((a.double() - b).abs().max() / b.abs().max()).item()\n"
        "        assert err <= tol, (dtype, err)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "FASTRLHF_CPU_PATH": "base"}
    res = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


# ---- bad input: one test per case -------------------------------------------------------------
def test_rejects_wrong_ndim():
    q, k, v = make(1, 2, 2, 4, 4, 8)
    with pytest.raises(ValueError, match=r"q must be \(B, H, Tq, D\); got shape \(2, 4, 8\)"):
        causal_attention(q[0], k, v)


def test_rejects_mismatched_batch():
    q, k, v = make(2, 2, 2, 4, 4, 8)
    with pytest.raises(
        ValueError, match=r"k must be \(B, Hkv, Tk, D\) with the B and D of q \(2, 8\); got \(1, 2, 4, 8\)"
    ):
        causal_attention(q, k[:1], v[:1])


def test_rejects_mismatched_head_dim():
    q, k, v = make(1, 2, 2, 4, 4, 8)
    with pytest.raises(
        ValueError, match=r"k must be \(B, Hkv, Tk, D\) with the B and D of q \(1, 8\); got \(1, 2, 4, 6\)"
    ):
        causal_attention(q, k[..., :6], v[..., :6])


def test_rejects_v_shape_unlike_k():
    q, k, v = make(1, 4, 2, 4, 4, 8)
    with pytest.raises(ValueError, match=r"v must have the shape of k \(1, 2, 4, 8\); got \(1, 1, 4, 8\)"):
        causal_attention(q, k, v[:, :1])


def test_rejects_more_queries_than_keys():
    q, k, v = make(1, 2, 2, 5, 4, 8)
    with pytest.raises(
        ValueError, match=r"q must have no more positions than k \(Tq <= Tk\); got Tq = 5, Tk = 4"
    ):
        causal_attention(q, k, v)


def test_rejects_heads_not_a_multiple():
    q, k, v = make(1, 6, 4, 4, 4, 8)
    with pytest.raises(ValueError, match=r"H % Hkv == 0\); got H = 6, Hkv = 4"):
        causal_attention(q, k, v)


def test_rejects_head_dim_over_256():
    q, k, v = make(2, 4, 4, 9, 9, 300)
    with pytest.raises(
        ValueError, match=r"q must be \(B, H, Tq, D\) with 1 <= D <= 256; got \(2, 4, 9, 300\)"
    ):
        causal_attention(q, k, v)


def test_rejects_integer_q():
    q, k, v = make(1, 2, 2, 4, 4, 8)
    with pytest.raises(ValueError, match="q must be float32, float64, bfloat16 or float16; got int64"):
        causal_attention(q.long(), k.long(), v.long())


def test_rejects_kv_dtype_unlike_q():
    q, k, v = make(1, 2, 2, 4, 4, 8)
    with pytest.raises(ValueError, match=r"k must have the dtype of q \(float32\); got bfloat16"):
        causal_attention(q, k.bfloat16(), v)


def test_rejects_segment_ids_shape():
    q, k, v = make(2, 2, 2, 4, 6, 8)
    with pytest.raises(ValueError, match=r"segment_ids must be \(B, Tk\) = \(2, 6\); got shape \(2, 4\)"):
        causal_attention(q, k, v, segment_ids=torch.zeros(2, 4, dtype=torch.long))


def test_rejects_float_segment_ids():
    q, k, v = make(2, 2, 2, 4, 6, 8)
    with pytest.raises(ValueError, match="segment_ids must have an integer dtype; got float32"):
        causal_attention(q, k, v, segment_ids=torch.zeros(2, 6))


def test_rejects_tensors_on_different_devices():
    q, k, v = make(1, 2, 2, 4, 4, 8)
    with pytest.raises(ValueError, match="v must be on the same device as q"):
        causal_attention(q, k, v.to("meta"))


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), float("-inf"), 0.0, -0.125])
def test_rejects_nonfinite_or_nonpositive_scale(scale):
    """Issue 22: scale=nan silently returned NaN. The message names scale, the expectation and the value."""
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(
        ValueError, match=rf"scale must be finite and > 0 \(default D\*\*-0.5\); got {scale:g}$"
    ):
        causal_attention(q, q, q, scale=scale)
    with pytest.raises(ValueError, match="scale must be finite and > 0"):  # the raw backward checks it too
        torch.ops.fastrlhf.causal_attention_bwd(
            q, q, q, q, q, torch.zeros(1, 2, 3, dtype=torch.float64), scale, None
        )
