"""causal_attention reads a KV-cache view k[:, :, :Tk] of a longer buffer in place (no copy)."""

import pytest
import torch
from fastrlhf.ops import causal_attention, reference


@pytest.mark.parametrize(
    "B,H,Hkv,Tq,Tk,max_len,D",
    [(3, 4, 4, 1, 37, 64, 16), (2, 6, 2, 5, 19, 20, 59), (1, 2, 1, 1, 1, 8, 8), (4, 1, 1, 3, 9, 33, 7)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cache_view_equals_reference(B, H, Hkv, Tq, Tk, max_len, D, dtype):
    q = torch.randn(B, H, Tq, D, dtype=dtype)
    cache_k, cache_v = torch.randn(2, B, Hkv, max_len, D, dtype=dtype)  # junk past Tk must not be read
    k, v = cache_k[:, :, :Tk], cache_v[:, :, :Tk]  # (B, Hkv, Tk, D) views, planes max_len * D apart
    seg = torch.ones(B, Tk, dtype=torch.long)
    seg[0, : Tk // 3] = 0  # a left-padded row
    got = causal_attention(q, k, v, segment_ids=seg)
    want = reference.causal_attention(q.double(), k.double(), v.double(), segment_ids=seg)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got, causal_attention(q, k.contiguous(), v.contiguous(), segment_ids=seg))


def test_other_strided_views_still_read_correctly():
    q = torch.randn(2, 4, 3, 8)
    base = torch.randn(2, 9, 4, 8)  # (B, T, H, D): k as a transpose has rows 4 * 8 apart, not D
    k, v = base.transpose(1, 2), base.flip(1).transpose(1, 2)
    k2 = torch.randn(4, 2, 9, 8).transpose(0, 1)  # planes in the wrong order
    for kk, vv in ((k, v), (k2, k2)):
        want = reference.causal_attention(q, kk, vv)
        torch.testing.assert_close(causal_attention(q, kk, vv), want, atol=1e-5, rtol=1e-5)
