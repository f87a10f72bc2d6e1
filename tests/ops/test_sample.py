import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import scipy.stats
import torch
from fastrlhf.ops import reference, sample

ROOT = Path(__file__).resolve().parents[2]
op = torch.ops.fastrlhf.sample


# ---- Philox4x32-10 in Python, to predict the kernel's uniforms ---------------------------------------
def philox4x32_10(ctr, key):
    M = 0xFFFFFFFF
    c, (k0, k1) = list(ctr), key
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & M, (k1 + 0xBB67AE85) & M
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & M, p1 & M, ((p0 >> 32) ^ c[3] ^ k1) & M, p0 & M]
    return c


def uniform(seed, row):
    """philox_uniform(seed, row, draw=0) of csrc/common/philox.h."""
    r = philox4x32_10((row & 0xFFFFFFFF, row >> 32, 0, 0), (seed & 0xFFFFFFFF, seed >> 32))
    return (((r[0] << 32) | r[1]) >> 11) * 2.0**-53


# Random123's known-answer vectors (kat_vectors): counter, key -> output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def test_python_philox_known_answers():
    for ctr, key, want in KAT:
        assert tuple(philox4x32_10(ctr, key)) == want


def test_philox_header_known_answers(tmp_path):
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    assert cxx, "a C++ compiler is needed to build fastrlhf, so the tests expect one"
    src = tmp_path / "kat.cpp"
    calls = "\n".join(
        f"  r = fr::philox4x32_10({', '.join(map(hex, c))}, {', '.join(map(hex, k))});"
        ' std::printf("%08x %08x %08x %08x\\n", r.v[0], r.v[1], r.v[2], r.v[3]);'
        for c, k, _ in KAT
    )
    src.write_text(
        f'#include <cstdio>\n#include "common/philox.h"\nint main() {{\n  fr::Philox4x32 r;\n{calls}\n}}\n'
    )
    subprocess.run(
        [cxx, "-std=c++17", "-O1", f"-I{ROOT / 'csrc'}", str(src), "-o", str(tmp_path / "kat")], check=True
    )
    out = subprocess.run([str(tmp_path / "kat")], capture_output=True, text=True, check=True).stdout.split(
        "\n"
    )
    assert out[:3] == [" ".join(f"{w:08x}" for w in want) for _, _, want in KAT]


# ---- helpers -----------------------------------------------------------------------------------------
def params(B, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    def row(x, dt):
        return x.to(dt) if isinstance(x, torch.Tensor) else torch.full((B,), x, dtype=dt)

    return (
        row(temperature, torch.float64),
        row(top_k, torch.int64),
        row(top_p, torch.float64),
        row(min_p, torch.float64),
    )


def raw(logits, seed, **kw):
    return op(logits, *params(logits.shape[0], **kw), torch.tensor([seed]))


def inverse_cdf(filtered, seed):
    """Token per row: the first index whose running filtered probability exceeds u * total."""
    probs = filtered.exp()  # (B, V) float64
    csum = probs.cumsum(1)
    u = torch.tensor([uniform(seed, b) for b in range(probs.shape[0])], dtype=torch.float64)
    return torch.searchsorted(csum, (u * csum[:, -1])[:, None], right=True).squeeze(1)


def logits_with_ties(B, V, scale=2.0, dtype=torch.float32):
    x = torch.randn(B, V, dtype=torch.float64) * scale
    x[:, 1:4] = x[:, :1]  # a tied run somewhere in the order
    x[:, -3:] = x[:, :3].amax(1, keepdim=True)  # ties at the max
    return x.to(dtype)


CONFIGS = {
    "plain": dict(),
    "temperature": dict(temperature=0.6),
    "top_k": dict(temperature=0.8, top_k=5),
    "top_p": dict(top_p=0.7),
    "min_p": dict(min_p=0.05),
    "combo": dict(temperature=0.8, top_k=50, top_p=0.9, min_p=0.01),
    "mid_k": dict(top_k=200, top_p=0.95),  # top-k from 64- or 8-token group maxima (by V)
    "big_k": dict(temperature=1.2, top_k=700),  # from 8-token group maxima or the streamed buffer
    "large_k_top_p": dict(top_k=1500, top_p=0.8),  # streamed buffer, then the top-p histogram
    "tiny_top_p": dict(top_p=1e-6),
}


# ---- exact semantics: the token is the inverse CDF of the Philox uniform under the reference ---------
# float32 at every V; float64 and bf16 rows (the scalar path; a converted row) at one V.
@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize(
    "V,dtype",
    [
        (7, torch.float32),
        (5000, torch.float32),
        (50257, torch.float32),
        (5000, torch.float64),
        (5000, torch.bfloat16),
    ],
)
def test_tokens_are_inverse_cdf_of_reference_filter(name, V, dtype):
    kw = CONFIGS[name]
    x = logits_with_ties(16, V, dtype=dtype)
    seed = 12345 + V
    tokens, _ = raw(x, seed, **kw)
    want = inverse_cdf(reference.sample_filter(x.double(), **kw), seed)
    assert torch.equal(tokens, want)


@pytest.mark.parametrize("k", [0, 1, 5, 50, 200, 700, 1500])
def test_heavy_ties_at_every_top_k_path(k):
    """Integer logits: the k-th value is tied many times over, inside and outside every candidate buffer."""
    x = torch.randn(12, 5000, dtype=torch.float64).mul(2).round().float()
    kw = dict(
        top_k=k, top_p=torch.tensor([1.0, 0.9, 0.5, 1e-6] * 3), min_p=torch.tensor([0.0] * 8 + [0.2] * 4)
    )
    tokens, _ = raw(x, 11, **kw)
    assert torch.equal(tokens, inverse_cdf(reference.sample_filter(x, **kw), 11))


@pytest.mark.parametrize("scale", [1.0, 6.0])
def test_top_p_nucleus_found_among_first_candidates_or_not(scale):
    """Top-p alone first looks among the 256 most likely tokens (peaked rows), else over the whole row."""
    x = logits_with_ties(12, 20000, scale=scale)
    kw = dict(
        temperature=0.9,
        top_p=torch.tensor([0.3, 0.9, 0.99, 0.999] * 3),
        min_p=torch.tensor([0.0] * 8 + [1e-3] * 4),
    )
    tokens, _ = raw(x, 17, **kw)
    assert torch.equal(tokens, inverse_cdf(reference.sample_filter(x, **kw), 17))


@pytest.mark.parametrize("k", [50, 700, 1500])
def test_fewer_finite_logits_than_top_k(k):
    x = torch.full((6, 5000), float("-inf"))
    x[:, 100:130] = torch.randn(6, 30)  # 30 finite logits: top-k keeps them all
    kw = dict(top_k=k, top_p=torch.tensor([1.0, 0.8] * 3))
    tokens, _ = raw(x, 13, **kw)
    assert torch.equal(tokens, inverse_cdf(reference.sample_filter(x, **kw), 13))


def test_per_row_parameters_are_inverse_cdf_of_reference_filter():
    B, V = 8, 300
    x = logits_with_ties(B, V)
    kw = dict(
        temperature=torch.tensor([0.0, 0.5, 1.0, 1.5, 0.8, 0.8, 2.0, 0.0]),
        top_k=torch.tensor([0, 3, 0, 40, 0, 1, 2000, 7]),
        top_p=torch.tensor([0.5, 1.0, 0.3, 0.9, 1e-6, 1.0, 0.95, 0.2]),
        min_p=torch.tensor([0.0, 0.0, 0.2, 0.01, 0.0, 0.5, 0.0, 0.9]),
    )
    tokens, _ = raw(x, 7, **kw)
    assert torch.equal(tokens, inverse_cdf(reference.sample_filter(x, **kw), 7))


# ---- greedy and top_k = 1 -----------------------------------------------------------------------------
def test_temperature_zero_is_first_argmax_with_temperature_one_logprob():
    x = torch.randn(33, 1000)
    x[5, [10, 20]] = 100.0  # tied max: the first index wins
    tokens, logprobs = sample(x, temperature=0.0, top_k=3, top_p=0.2)
    assert torch.equal(tokens, x.argmax(1)) and tokens[5] == 10
    torch.testing.assert_close(logprobs.double(), torch.log_softmax(x.double(), 1).amax(1), rtol=0, atol=2e-6)


def test_top_k_one_is_argmax():
    x = torch.randn(64, 50257)
    tokens, logprobs = sample(x, temperature=0.7, top_k=1)
    assert torch.equal(tokens, x.argmax(1))
    torch.testing.assert_close(
        logprobs.double(), torch.log_softmax(x.double() / 0.7, 1).amax(1), rtol=0, atol=2e-6
    )


# ---- distribution: 20k draws vs the filtered distribution -----------------------------------------------
def chi2_pvalue(tokens, probs):
    """Chi-square p-value of token counts against probs (V,); bins expecting < 5 are pooled."""
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    assert counts[probs == 0].sum() == 0, "a token outside the allowed set was drawn"
    expected = probs * tokens.numel()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big & (probs > 0)].sum()[None]])
    exp = torch.cat([expected[big], expected[~big & (probs > 0)].sum()[None]])
    obs, exp = (obs[:-1], exp[:-1]) if exp[-1] == 0 else (obs, exp)
    return scipy.stats.chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue


CHI2 = {
    "top_k": dict(temperature=0.8, top_k=10),
    "top_p": dict(top_p=0.8),
    "min_p": dict(min_p=0.1),
    "combo": dict(temperature=1.3, top_k=30, top_p=0.9, min_p=0.02),
    "large_k_top_p": dict(top_k=1100, top_p=0.6),
}


@pytest.mark.parametrize("name", CHI2)
def test_draws_match_filtered_distribution(name):
    kw = CHI2[name]
    V = 1200 if name == "large_k_top_p" else 60
    row = torch.randn(1, V) * 1.5
    row[0, :6] = row[0, 6]  # ties
    N = 20000
    tokens, _ = sample(row.expand(N, V), **kw, generator=torch.Generator().manual_seed(1))
    probs = reference.sample_filter(row, **kw).exp()[0]
    assert chi2_pvalue(tokens, probs) > 1e-4


def test_draws_match_filtered_distribution_per_row_parameters():
    V, N = 40, 20000
    row = torch.randn(1, V) * 1.5
    cfg = [
        dict(temperature=0.5, top_k=8, top_p=1.0, min_p=0.0),
        dict(temperature=1.0, top_k=0, top_p=0.75, min_p=0.0),
        dict(temperature=2.0, top_k=0, top_p=1.0, min_p=0.2),
        dict(temperature=0.9, top_k=20, top_p=0.8, min_p=0.05),
    ]
    kw = {name: torch.tensor([c[name] for c in cfg]).repeat_interleave(N) for name in cfg[0]}  # (4 N,)
    tokens, _ = sample(row.expand(4 * N, V), **kw, generator=torch.Generator().manual_seed(2))
    for i, c in enumerate(cfg):
        probs = reference.sample_filter(row, **c).exp()[0]
        assert chi2_pvalue(tokens[i * N : (i + 1) * N], probs) > 1e-4, c


# ---- allowed set, logprobs, dtypes, shapes --------------------------------------------------------------
@pytest.mark.parametrize("V", [7, 50257])
@pytest.mark.parametrize(
    "kw",
    [
        dict(top_p=1e-6),
        dict(temperature=0.8, top_k=50, top_p=0.9),
        dict(top_p=0.95, min_p=0.3),
        dict(top_k=3),
        dict(top_k=2000, top_p=0.5),
    ],
    ids=str,
)
def test_tokens_stay_in_allowed_set_and_logprobs_match(V, kw):
    x = logits_with_ties(32, V, dtype=torch.bfloat16).float()  # bf16 values: many ties
    x[:, 5] = float("-inf")  # a banned token
    allowed = reference.sample_filter(x, **kw) > float("-inf")  # (B, V)
    scaled_logp = torch.log_softmax(x.double() / kw.get("temperature", 1.0), 1)  # (B, V)
    g = torch.Generator().manual_seed(3)
    for _ in range(10):
        tokens, logprobs = sample(x, **kw, generator=g)
        assert allowed.gather(1, tokens[:, None]).all()
        torch.testing.assert_close(
            logprobs.double(), scaled_logp.gather(1, tokens[:, None])[:, 0], rtol=0, atol=2e-6
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_logits(dtype):
    x = (torch.randn(16, 50257) * 3).to(dtype)
    kw = dict(temperature=0.9, top_k=100, top_p=0.8)
    tokens, logprobs = raw(x, 99, **kw)
    ref = x.double()  # the kernel reads each half value exactly
    assert torch.equal(tokens, inverse_cdf(reference.sample_filter(ref, **kw), 99))
    want = torch.log_softmax(ref / 0.9, 1).gather(1, tokens[:, None])[:, 0]
    assert logprobs.dtype == torch.float32
    torch.testing.assert_close(logprobs.double(), want, rtol=0, atol=2e-6)


def test_single_row_and_single_token():
    assert sample(torch.tensor([[3.0]]), top_p=0.1)[0].tolist() == [0]
    x = torch.randn(1, 50257)
    tokens, logprobs = sample(x, top_p=0.5)
    assert tokens.shape == (1,) and logprobs.shape == (1,)
    assert reference.sample_filter(x, top_p=0.5)[0, tokens[0]] > float("-inf")


def test_empty_batch():
    tokens, logprobs = sample(torch.randn(0, 11), top_k=2)
    assert tokens.shape == (0,) and tokens.dtype == torch.int64 and logprobs.shape == (0,)


def test_noncontiguous_logits():
    x = torch.randn(300, 8).t()  # (8, 300) with strides (1, 8)
    assert torch.equal(raw(x, 5, top_p=0.6)[0], raw(x.contiguous(), 5, top_p=0.6)[0])


# ---- randomness: thread count, seeds, generators ------------------------------------------------------
def test_independent_of_thread_count():
    x = logits_with_ties(64, 50257)
    kw = dict(
        temperature=0.8, top_k=torch.tensor([0, 50] * 32), top_p=0.9, min_p=torch.tensor([0.0, 0.05] * 32)
    )
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = sample(x, **kw, generator=torch.Generator().manual_seed(4))
        torch.set_num_threads(2)
        two = sample(x, **kw, generator=torch.Generator().manual_seed(4))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_same_generator_state_same_tokens_and_fresh_draws_differ():
    x = torch.randn(64, 1000)
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    a, _ = sample(x, generator=g)
    b, _ = sample(x, generator=g)  # the generator advanced: new draws
    g.set_state(state)
    c, _ = sample(x, generator=g)
    assert torch.equal(a, c) and not torch.equal(a, b)
    torch.manual_seed(6)
    d, _ = sample(x)
    torch.manual_seed(6)
    assert torch.equal(d, sample(x)[0])


# ---- torch integration ----------------------------------------------------------------------------------
def test_opcheck():
    x = torch.randn(4, 37)
    torch.library.opcheck(op.default, (x, *params(4, temperature=0.7, top_k=5, top_p=0.9), torch.tensor([3])))


def test_compile_fullgraph():
    x = torch.randn(4, 37)
    f = torch.compile(lambda t: sample(t, temperature=0.0, top_k=5), fullgraph=True, backend="aot_eager")
    tokens, _logprobs = f(x)
    assert torch.equal(tokens, x.argmax(1))
    g = torch.compile(lambda t: sample(t, temperature=0.7, top_p=0.8), fullgraph=True, backend="aot_eager")
    tokens, _ = g(x)
    assert (
        reference.sample_filter(x, temperature=0.7, top_p=0.8).gather(1, tokens[:, None]) > float("-inf")
    ).all()


def test_baseline_cpu_path_matches_reference():
    """The scalar build (FASTRLHF_CPU_PATH=base) must follow the same contract."""
    code = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); import test_sample as t\n"
        "import fastrlhf; assert fastrlhf.build_info()['cpu_path'] == 'base'\n"
        "for name in ('plain', 'combo', 'top_p', 'big_k', 'large_k_top_p', 'min_p'):\n"
        "    t.test_tokens_are_inverse_cdf_of_reference_filter(name, 5000, torch.float32)\n"
        "t.test_heavy_ties_at_every_top_k_path(50)\n"
    )
    env = {**os.environ, "FASTRLHF_CPU_PATH": "base"}
    subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], env=env, check=True, timeout=120)


def test_reference_top_p_matches_pairwise_definition():
    """reference.sample_filter's sort-based top-p equals the definition computed pairwise (ties included):
    keep token i iff the mass of survivors strictly more likely than i is < top_p."""
    x = logits_with_ties(6, 1500, dtype=torch.bfloat16).double()  # many ties
    for kw in [
        dict(top_p=0.3),
        dict(top_p=0.9, top_k=500),
        dict(top_p=1e-6),
        dict(top_p=0.99, temperature=0.5),
    ]:
        got = reference.sample_filter(x, **kw) > float("-inf")  # (B, V)
        T = kw.get("temperature", 1.0)
        scaled = x / T
        k = kw.get("top_k", 0)
        keep = (
            scaled >= scaled.topk(k, dim=1).values[:, -1:] if k else torch.ones_like(scaled, dtype=torch.bool)
        )
        probs = torch.softmax(scaled.masked_fill(~keep, float("-inf")), dim=1)  # (B, V)
        above = (probs[:, None, :] * (probs[:, None, :] > probs[:, :, None])).sum(-1)  # (B, V) pairwise
        assert torch.equal(got, keep & (above < kw["top_p"]))


# ---- bad input: one test per case ----------------------------------------------------------------------
def test_rejects_wrong_ndim():
    with pytest.raises(ValueError, match=r"logits must be \(B, V\); got shape \(2, 3, 4\)"):
        sample(torch.randn(2, 3, 4))


def test_rejects_integer_logits():
    with pytest.raises(ValueError, match="logits must be float32, float64, bfloat16 or float16; got int64"):
        sample(torch.ones(2, 3, dtype=torch.long))


def test_rejects_empty_vocabulary():
    with pytest.raises(
        ValueError, match=r"logits must have at least one column \(V >= 1\); got shape \(2, 0\)"
    ):
        sample(torch.randn(2, 0))


def test_rejects_nan_naming_the_row():
    x = torch.randn(4, 100)
    x[2, 17] = float("nan")
    with pytest.raises(ValueError, match="logits must not contain NaN; row 2 does"):
        sample(x)


def test_rejects_positive_inf_naming_the_row():
    x = torch.randn(4, 100)
    x[3, 99] = float("inf")
    with pytest.raises(ValueError, match=r"logits must not contain \+inf; row 3 does"):
        sample(x, temperature=0.0)


def test_rejects_all_negative_inf_row():
    x = torch.randn(3, 100)
    x[1] = float("-inf")
    with pytest.raises(ValueError, match="logits row 1 is all -inf"):
        sample(x)


def test_negative_inf_bans_tokens():
    x = torch.zeros(1000, 5)
    x[:, [0, 2, 3]] = float("-inf")
    tokens, logprobs = sample(x, top_k=4)
    assert set(tokens.tolist()) == {1, 4}
    torch.testing.assert_close(logprobs, torch.full((1000,), -0.6931472), rtol=0, atol=1e-6)


@pytest.mark.parametrize("top_p", [0.0, 1.5, float("nan")])
def test_rejects_top_p_out_of_range(top_p):
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\] \(1 = off\); got .* at row 0"):
        sample(torch.randn(2, 5), top_p=top_p)


def test_rejects_negative_top_k():
    with pytest.raises(ValueError, match=r"top_k must be >= 0 \(0 = off\); got -1 at row 1"):
        sample(torch.randn(2, 5), top_k=torch.tensor([3, -1]))


@pytest.mark.parametrize("temperature", [-0.5, float("inf")])
def test_rejects_bad_temperature(temperature):
    with pytest.raises(ValueError, match=r"temperature must be finite and >= 0 \(0 = greedy\); got"):
        sample(torch.randn(2, 5), temperature=temperature)


@pytest.mark.parametrize("min_p", [-0.1, 1.1])
def test_rejects_min_p_out_of_range(min_p):
    with pytest.raises(ValueError, match=r"min_p must be in \[0, 1\] \(0 = off\); got"):
        sample(torch.randn(2, 5), min_p=min_p)


def test_rejects_per_row_tensor_of_wrong_length():
    with pytest.raises(
        ValueError,
        match=r"top_p must be a number or a \(B,\) tensor with B = 3 \(rows of logits\); got shape \(2\)",
    ):
        sample(torch.randn(3, 5), top_p=torch.tensor([0.5, 0.9]))


def test_rejects_parameters_on_another_device():
    with pytest.raises(ValueError, match="temperature must be on the same device as logits"):
        sample(torch.randn(2, 5), temperature=torch.ones(2, device="meta"))
