"""ops.rope against the reference in float64, its cosines and sines bit for bit, HF's
apply_rotary_pos_emb in fp32 and torch's own error in fp32/bf16/fp16, on every CPU path; strided inputs,
gradcheck, opcheck, torch.compile and bad input."""

import pytest
import torch
from fastrlhf.ops import reference, rope
from helpers.cpu_paths import avx2_and_avx512

LOW = [torch.float32, torch.bfloat16, torch.float16]


def inv_freq(D, theta=10000.0):
    return 1.0 / (theta ** (torch.arange(0, D, 2).float() / D))  # (D/2,), as rope_inv_freq


def fwd_bwd(fn, q, k, pos, inv, dq, dk):
    """Rotated q, k and the gradients for upstream dq, dk ((B, H, T, D) each)."""
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    qo, ko = fn(q, k, pos, inv)
    torch.autograd.backward([qo, ko], [dq, dk])
    return qo.detach(), ko.detach(), q.grad, k.grad


def reference_rope(q, k, pos, inv):
    return reference.rope(q, pos, inv), reference.rope(k, pos, inv)


def inputs(B, T, H, Hkv, D, dtype=torch.float64, max_pos=4096):
    q, k = torch.randn(B, T, H, D, dtype=torch.float64), torch.randn(B, T, Hkv, D, dtype=torch.float64)
    dq, dk = torch.randn(B, H, T, D, dtype=torch.float64), torch.randn(B, Hkv, T, D, dtype=torch.float64)
    pos = torch.randint(0, max_pos, (B, T))
    return [t.to(dtype).double() for t in (q, k, dq, dk)] + [pos]


SHAPES = [(1, 97, 9, 3, 64), (2, 33, 4, 1, 80), (3, 5, 2, 2, 6), (1, 1, 1, 1, 2)]


@pytest.mark.parametrize("B, T, H, Hkv, D", SHAPES)
def test_float64_equals_reference(cpu_path, B, T, H, Hkv, D):
    q, k, dq, dk, pos = inputs(B, T, H, Hkv, D)
    inv = inv_freq(D)
    for p in (pos, pos[0]):  # (B, T) and one (T,) row for the whole batch
        got, want = fwd_bwd(rope, q, k, p, inv, dq, dk), fwd_bwd(reference_rope, q, k, p, inv, dq, dk)
        for name, a, b in zip(("q", "k", "dq", "dk"), got, want):
            torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14, msg=name)


def test_cos_sin_are_the_rounded_exact_values(cpu_path):
    """A unit vector in pair i comes out as (cos a_i, sin a_i), and its gradient as (cos a_i, -sin a_i):
    equal bit for bit to the fp32 roundings of the exact values, for angles up to ~1e6 radians."""
    D, T = 128, 300
    inv = inv_freq(D, theta=500000.0)
    pos = torch.cat([torch.arange(200), torch.randint(0, 2**20, (100,))])  # (T,)
    q = torch.zeros(1, T, D // 2, D)
    q[0, :, torch.arange(D // 2), torch.arange(D // 2)] = 1  # head i holds e_i
    qo, _ = rope(q, None, pos, inv)
    cos, sin = reference.rope_cos_sin(pos, inv)  # (T, D/2)
    idx = torch.arange(D // 2)
    assert torch.equal(qo[0, idx, :, idx], cos.t()) and torch.equal(qo[0, idx, :, idx + D // 2], sin.t())
    dq, _ = torch.ops.fastrlhf.rope_bwd(q.transpose(1, 2).contiguous(), q.new_empty(1, 0, T, D), pos, inv)
    assert torch.equal(dq[0, :, idx, idx], cos) and torch.equal(dq[0, :, idx, idx + D // 2], -sin)


def test_matches_hf_apply_rotary_pos_emb_in_fp32():
    """HF's fp32 cos/sin are within 1 ulp of the rounded exact ones; the rotations agree to fp32 rounding."""
    q, k, _, _, pos = inputs(2, 97, 9, 3, 64, torch.float32)
    q, k, inv = q.float(), k.float(), inv_freq(64)
    for a, b in zip(rope(q, k, pos, inv), reference.hf_rope(q, k, pos, inv)):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)


@pytest.mark.parametrize("dtype", LOW)
def test_within_twice_torchs_error(cpu_path, dtype):
    """Max abs error against float64, forward and backward, at most twice HF's formula's in the dtype."""
    for shape in [(1, 97, 9, 3, 64), (2, 33, 4, 2, 80)]:
        q, k, dq, dk, pos = inputs(*shape, dtype=dtype)
        inv = inv_freq(shape[-1])
        exact = fwd_bwd(reference_rope, q, k, pos, inv, dq, dk)
        low = [t.to(dtype) for t in (q, k)], [t.to(dtype) for t in (dq, dk)]
        ours = fwd_bwd(rope, *low[0], pos, inv, *low[1])
        torch_ = fwd_bwd(reference.hf_rope, *low[0], pos, inv, *low[1])
        for name, o, t, e in zip(("q", "k", "dq", "dk"), ours, torch_, exact):
            assert o.dtype == dtype
            err, err_torch = (o.double() - e).abs().max(), (t.double() - e).abs().max()
            assert err <= 2 * err_torch, (shape, name, err.item(), err_torch.item())


def test_reads_a_view_of_a_fused_projection(cpu_path):
    """q and k as views of one (B, T, (H + 2 Hkv) D) projection (rows of D strided) need no copy."""
    B, T, H, Hkv, D = 2, 17, 6, 2, 64
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D)
    q = qkv[..., : H * D].view(B, T, H, D)
    k = qkv[..., H * D : (H + Hkv) * D].view(B, T, Hkv, D)
    pos, inv = torch.arange(T), inv_freq(D)
    for a, b in zip(rope(q, k, pos, inv), (reference.rope(q, pos, inv), reference.rope(k, pos, inv))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert a.is_contiguous()


def test_k_none_and_empty():
    q = torch.randn(2, 5, 3, 8, requires_grad=True)
    qo, ko = rope(q, None, torch.arange(5), inv_freq(8))
    assert ko is None and qo.shape == (2, 3, 5, 8)
    qo.sum().backward()
    assert q.grad.shape == q.shape
    qo, ko = rope(
        torch.empty(2, 0, 3, 8), torch.empty(2, 0, 1, 8), torch.empty(2, 0, dtype=torch.long), inv_freq(8)
    )
    assert qo.shape == (2, 3, 0, 8) and ko.shape == (2, 1, 0, 8)


def test_gradcheck_float64(cpu_path):
    q = torch.randn(2, 3, 2, 6, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 1, 6, dtype=torch.float64, requires_grad=True)
    pos = torch.tensor([[0, 1, 2], [5, 9, 300]])
    assert torch.autograd.gradcheck(lambda a, b: rope(a, b, pos, inv_freq(6)), (q, k))


def test_vector_paths_agree_bit_for_bit():
    q, k, dq, dk, pos = inputs(2, 41, 9, 3, 80, max_pos=100000)
    for dtype in LOW:
        lo = [t.to(dtype) for t in (q, k, dq, dk)]
        runs = avx2_and_avx512(lambda: fwd_bwd(rope, lo[0], lo[1], pos, inv_freq(80), lo[2], lo[3]))
        assert all(torch.equal(a, b) for a, b in zip(*runs)), dtype


def test_opcheck():
    q, k = torch.randn(2, 5, 3, 8, requires_grad=True), torch.randn(2, 5, 1, 8, requires_grad=True)
    pos, inv = torch.randint(0, 50, (2, 5)), inv_freq(8)
    torch.library.opcheck(torch.ops.fastrlhf.rope_fwd.default, (q, k, pos, inv))
    torch.library.opcheck(
        torch.ops.fastrlhf.rope_bwd.default, (torch.randn(2, 3, 5, 8), torch.randn(2, 1, 5, 8), pos, inv)
    )


def test_compile_fullgraph():
    q, k = torch.randn(2, 5, 3, 8, requires_grad=True), torch.randn(2, 5, 1, 8, requires_grad=True)
    pos, inv = torch.randint(0, 50, (2, 5)), inv_freq(8)

    def loss(a, b):
        qo, ko = rope(a * 2, b, pos, inv)
        return (qo * qo.detach()).sum() + ko.sum()

    torch.compile(loss, fullgraph=True, backend="aot_eager")(q, k).backward()
    got = q.grad.clone(), k.grad.clone()
    q.grad = k.grad = None
    loss(q, k).backward()
    torch.testing.assert_close(got, (q.grad, k.grad))


# ---- bad input: the error names the argument, what was expected and what came -------------------------
Q, K, POS, INV = (
    torch.randn(2, 5, 3, 8),
    torch.randn(2, 5, 1, 8),
    torch.zeros(2, 5, dtype=torch.long),
    inv_freq(8),
)


@pytest.mark.parametrize(
    "args, match",
    [
        ((Q[0], K, POS, INV), r"q must be \(B, T, H, D\); got shape \(5, 3, 8\)"),
        (
            (torch.randn(2, 5, 3, 7), K, POS, INV),
            r"q must have an even head dim D in \[2, 512\]; got shape \(2, 5, 3, 7\)",
        ),
        (
            (Q, torch.randn(2, 4, 1, 8), POS, INV),
            r"k must be \(B, T, Hkv, D\) = \(2, 5, Hkv, 8\); got shape \(2, 4, 1, 8\)",
        ),
        ((Q, K.double(), POS, INV), r"k must have the dtype of q \(float32\); got float64"),
        ((Q.long(), K, POS, INV), "q must be float32, float64, bfloat16 or float16; got int64"),
        (
            (Q, K, POS[:, :4], INV),
            r"positions must be \(B, T\) = \(2, 5\) or \(T,\) = \(5,\); got shape \(2, 4\)",
        ),
        ((Q, K, POS.int(), INV), "positions must be int64; got int32"),
        ((Q, K, POS, INV[:3]), r"inv_freq must be \(D/2,\) = \(4,\); got shape \(3\)"),
        ((Q, K, POS.to("meta"), INV), r"positions must be on the same device as q \(cpu\); got meta"),
    ],
)
def test_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        rope(*args)


def test_bad_backward_input():
    dq = torch.randn(2, 3, 5, 8)
    with pytest.raises(
        ValueError, match=r"dk must be \(B, Hkv, T, D\) = \(2, Hkv, 5, 8\); got shape \(2, 1, 4, 8\)"
    ):
        torch.ops.fastrlhf.rope_bwd(dq, torch.randn(2, 1, 4, 8), POS, INV)
