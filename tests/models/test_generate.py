import pytest
import torch
from fastrlhf.models import GPT, GPTConfig, generate

CFG = GPTConfig(vocab_size=89, block_size=40, n_layer=2, n_head=4, n_embd=32)
PROMPTS = [[5, 6, 7], [8], [9, 10, 11, 12, 13, 14]]


@pytest.fixture(scope="module")
def m():
    torch.manual_seed(1)
    return GPT(CFG).eval()


def rescore(m, g, temperature=1.0):
    """Behaviour logprobs recomputed by one full forward over the sampled sequences."""
    pos, seg = g.layout()
    logits = m(g.sequences, positions=pos, segment_ids=seg)[0] / temperature
    Tp = g.prompt_mask.shape[1]
    return torch.log_softmax(logits[:, Tp - 1 : -1], -1).gather(-1, g.responses[..., None]).squeeze(-1)


def test_logprobs_equal_a_full_forward_rescore(m):
    g = generate(
        m, PROMPTS, 12, temperature=0.7, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(0)
    )
    assert g.responses.shape == g.logprobs.shape == g.response_mask.shape == (3, 12)
    assert g.sequences.shape == (3, 6 + 12)
    assert g.prompt_mask.sum(1).tolist() == [3, 1, 6]
    torch.testing.assert_close(g.logprobs, rescore(m, g, 0.7), atol=1e-5, rtol=1e-5)


def test_greedy_equals_argmax_without_cache(m):
    g = generate(m, PROMPTS, 8, temperature=0.0)
    for b, p in enumerate(PROMPTS):
        seq = torch.tensor([p])
        for _ in range(8):
            seq = torch.cat([seq, m(seq)[0][:, -1].argmax(-1, keepdim=True)], 1)
        assert g.responses[b].tolist() == seq[0, len(p) :].tolist()


def test_seeded_runs_repeat_and_differ_across_seeds(m):
    run = lambda s: generate(m, PROMPTS, 10, generator=torch.Generator().manual_seed(s)).responses
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_tokens_after_eos_are_masked(m):
    g0 = generate(m, PROMPTS, 10, temperature=0.0)
    eos = int(g0.responses[0, 2])  # row 0 emits this token greedily at step 2
    g = generate(m, PROMPTS, 10, temperature=0.0, eos_token_id=eos, pad_token_id=0)
    for b in range(3):
        hits = (g0.responses[b] == eos).nonzero()
        end = int(hits[0]) + 1 if len(hits) else g.responses.shape[1]
        assert g.response_mask[b].tolist() == [True] * end + [False] * (g.responses.shape[1] - end)
        assert (g.responses[b, end:] == 0).all() and (g.logprobs[b, end:] == 0).all()
        assert g.responses[b, :end].tolist() == g0.responses[b, :end].tolist()


def test_stops_early_when_every_row_is_done(m):
    g0 = generate(m, [[1, 2]], 10, temperature=0.0)
    eos = int(g0.responses[0, 1])
    first = g0.responses[0].tolist().index(eos)
    g = generate(m, [[1, 2]], 10, temperature=0.0, eos_token_id=eos)
    assert g.responses.shape == (1, first + 1) and g.response_mask.all()


def test_per_row_sampling_options(m):
    g = generate(
        m,
        PROMPTS,
        6,
        temperature=torch.tensor([0.0, 1.0, 0.5]),
        top_k=torch.tensor([0, 5, 1]),
        generator=torch.Generator().manual_seed(0),
    )
    greedy = generate(m, PROMPTS, 6, temperature=0.0)
    assert torch.equal(g.responses[0], greedy.responses[0]) and torch.equal(
        g.responses[2], greedy.responses[2]
    )


def test_model_mode_is_restored(m):
    m.train()
    generate(m, PROMPTS, 2)
    assert m.training
    m.eval()


@pytest.mark.parametrize(
    "prompts,max_new,match",
    [
        ([list(range(41))], 1, "prompt 0 has 41 tokens, longer than the context"),
        ([[1] * 30, [2]], 11, r"longest prompt \(30\) \+ max_new_tokens \(11\) = 41 exceeds block_size 40"),
        ([[1], []], 4, "prompt 1 is empty"),
        ([], 4, "at least one prompt"),
        ([[1, 89]], 4, r"token ids must be in \[0, 89\); prompt 0 holds 89"),
        ([[-3]], 4, "prompt 0 holds -3"),
        ([[1]], 0, "max_new_tokens must be a positive int"),
    ],
)
def test_bad_input(m, prompts, max_new, match):
    with pytest.raises(ValueError, match=match):
        generate(m, prompts, max_new)


def test_bad_eos_id(m):
    with pytest.raises(ValueError, match=r"eos_token_id must be in \[0, 89\)"):
        generate(m, PROMPTS, 3, eos_token_id=89)


@pytest.mark.gpu
def test_generate_on_gpu_matches_rescoring(m):
    gpu = GPT(CFG).eval().cuda()
    gpu.load_weights(m.weights())
    g = generate(gpu, PROMPTS, 8, top_k=10, generator=torch.Generator("cuda").manual_seed(0))
    assert g.responses.is_cuda
    torch.testing.assert_close(g.logprobs, rescore(gpu, g), atol=1e-4, rtol=1e-4)
    assert torch.equal(
        generate(gpu, PROMPTS, 8, temperature=0.0).responses.cpu(),
        generate(m, PROMPTS, 8, temperature=0.0).responses,
    )


def test_rows_kernel_gives_what_torch_gemm_gives(m, monkeypatch):
    """The decode step's linears take ops.rows_linear; forcing torch's GEMM changes only fp32 rounding."""
    import sys

    run = lambda: generate(
        m, PROMPTS, 10, temperature=0.8, top_k=30, generator=torch.Generator().manual_seed(5)
    )
    fused = run()
    monkeypatch.setattr(sys.modules["fastrlhf.ops.linear"], "MAX_ROWS", 0)
    plain = run()
    assert torch.equal(fused.responses, plain.responses)
    torch.testing.assert_close(fused.logprobs, plain.logprobs, atol=1e-5, rtol=1e-5)
