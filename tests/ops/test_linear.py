import pytest
import torch
import torch.nn.functional as F
from fastrlhf.ops import linear, rows_linear
from fastrlhf.ops.linear import MAX_ROWS


def make(N, M, K, bias=True):
    x, w = torch.randn(N, K, dtype=torch.float64), torch.randn(M, K, dtype=torch.float64)
    b = torch.randn(M, dtype=torch.float64) if bias else None
    return x, w, b


# Ugly shapes: every register-tile remainder (M % 4, N % 3) and K not a multiple of 8.
@pytest.mark.parametrize(
    "N,M,K", [(1, 1, 1), (2, 3, 7), (3, 4, 8), (5, 97, 59), (16, 50, 256), (64, 4099, 33)]
)
@pytest.mark.parametrize("bias", [True, False])
def test_equals_float64_linear(N, M, K, bias):
    x, w, b = make(N, M, K, bias)
    got = rows_linear(x.float(), w.float(), None if b is None else b.float())
    torch.testing.assert_close(got.double(), F.linear(x, w, b), atol=1e-5 * K**0.5, rtol=1e-5)


def test_strided_rows_are_read_in_place():
    h = torch.randn(4, 9, 40)  # (B, T, C): the decode step reads h[:, -1]
    w = torch.randn(13, 40)
    torch.testing.assert_close(rows_linear(h[:, -1], w), F.linear(h[:, -1].contiguous(), w))
    torch.testing.assert_close(rows_linear(h[:, 0, ::2], w[:, :20]), F.linear(h[:, 0, ::2], w[:, :20]))


def test_independent_of_thread_count():
    x, w, b = (t.float() for t in make(7, 3001, 100))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = rows_linear(x, w, b)
        torch.set_num_threads(2)
        assert torch.equal(one, rows_linear(x, w, b))
    finally:
        torch.set_num_threads(old)


def test_linear_takes_the_kernel_only_at_inference():
    w = torch.randn(11, 24, requires_grad=True)
    x = torch.randn(2, 3, 24)
    y = linear(x, w)  # needs a gradient: plain F.linear, differentiable
    y.sum().backward()
    torch.testing.assert_close(w.grad, x.sum((0, 1)).expand(11, 24))
    with torch.no_grad():
        fused = linear(x, w)
        assert fused.shape == (2, 3, 11) and fused.grad_fn is None
        torch.testing.assert_close(fused, F.linear(x, w))
        big = torch.randn(MAX_ROWS + 1, 24)  # past MAX_ROWS: F.linear
        torch.testing.assert_close(linear(big, w), F.linear(big, w))
        torch.testing.assert_close(linear(x.double(), w.double()), F.linear(x.double(), w.double()))


def test_opcheck():
    x, w, b = (t.float() for t in make(5, 17, 12))
    torch.library.opcheck(
        torch.ops.fastrlhf.rows_linear.default, (x, w, b), test_utils=("test_schema", "test_faketensor")
    )
    torch.library.opcheck(
        torch.ops.fastrlhf.rows_linear.default, (x, w, None), test_utils=("test_schema", "test_faketensor")
    )


def test_compile_fullgraph():
    x, w, b = (t.float() for t in make(3, 10, 16))
    f = torch.compile(lambda x, w, b: rows_linear(x, w, b) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(x, w, b), rows_linear(x, w, b) * 2)


Z = torch.zeros


@pytest.mark.parametrize(
    "args,match",
    [
        ((Z(2, 3, 4), Z(5, 4), None), r"x must be \(N, K\); got shape \(2, 3, 4\)"),
        ((Z(2, 4), Z(5, 4, 1), None), r"weight must be \(M, K\); got shape \(5, 4, 1\)"),
        ((Z(2, 4), Z(5, 3), None), r"weight must be \(M, K\) with K = x.size\(1\) = 4; got shape \(5, 3\)"),
        ((Z(2, 4), Z(5, 4), Z(4)), r"bias must be \(M,\) with M = weight.size\(0\) = 5; got shape \(4\)"),
        ((Z(2, 4, dtype=torch.float64), Z(5, 4), None), "x must be float32; got float64"),
        ((Z(2, 4), Z(5, 4, dtype=torch.bfloat16), None), "weight must be float32; got bfloat16"),
        ((Z(2, 4), Z(5, 4), Z(5, dtype=torch.int64)), "bias must be float32; got int64"),
        ((Z(2, 4), Z(5, 4, device="meta"), None), "weight must be on the same device as x"),
    ],
)
def test_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        rows_linear(*args)
