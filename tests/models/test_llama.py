"""The Llama family (Llama, Qwen2, Qwen3) on the trunk against transformers' own models, random-init from
configs: logits both ways, left padding, packing, KV-cache decode, greedy generation, the scorer paths
(tail, hidden_at, shared prefixes) and bad input."""

from __future__ import annotations

import pytest
import torch
import transformers
from fastrlhf.models import KVCache, ScalarHeadModel, generate, left_pad_layout
from fastrlhf.models.config import LlamaConfig
from fastrlhf.models.llama import LlamaForCausalLM, config_from_hf, config_to_hf
from fastrlhf.models.shared import shared_layout

V = 101
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
HF = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
}
# family, n_kv_head, head_dim, tied, rope scaling: n_head 6 throughout
CASES = [
    ("llama", 1, 64, False, None),
    ("llama", 3, 80, True, LLAMA3),
    ("qwen2", 2, 64, False, None),
    ("qwen2", 3, 80, True, {"rope_type": "linear", "factor": 2.0}),
    ("qwen3", 2, 80, True, {"rope_type": "linear", "factor": 2.0}),
    ("qwen3", 6, 64, False, None),
]


def hf_model(family, n_kv, head_dim, tied, scaling, seed=0):
    torch.manual_seed(seed)
    cfg_cls, model_cls = HF[family]
    extra = {"rope_scaling": scaling} if scaling else {}
    hc = cfg_cls(
        vocab_size=V,
        hidden_size=6 * head_dim if family != "qwen3" else 200,  # Qwen3's head_dim is its own
        intermediate_size=144,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        rms_norm_eps=1e-6,
        rope_theta=5000.0,
        **extra,
    )
    hc._attn_implementation = "eager"
    model = model_cls(hc).eval()
    with torch.no_grad():  # unit norms and zero biases would hide a mis-wired one
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def ours_from(hf) -> LlamaForCausalLM:
    ours = LlamaForCausalLM(config_from_hf(hf.config.to_dict())).eval()
    ours.load_weights(dict(hf.state_dict()), source="transformers")
    return ours


def left_padded(B=3, T=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :1] = 0
    return idx, mask


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"{c[0]}-kv{c[1]}-d{c[2]}-{'tied' if c[3] else 'untied'}"
)
def test_logits_equal_transformers_on_a_left_padded_batch(case):
    hf = hf_model(*case)
    ours = ours_from(hf)
    assert ours.config.n_kv_head == case[1] and ours.config.head_dim == case[2]
    idx, mask = left_padded()
    positions, segments = left_pad_layout(mask)
    with torch.no_grad():
        want = hf(input_ids=idx, attention_mask=mask, position_ids=positions).logits
        got, _ = ours(idx, positions=positions, segment_ids=segments)
    real = mask.bool()
    assert (got - want)[real].abs().max() < 1e-4


@pytest.mark.parametrize("case", CASES[1:4:2], ids=["llama", "qwen2"])
def test_our_weights_load_in_transformers_with_equal_logits(case):
    torch.manual_seed(5)
    src = ours_from(hf_model(*case))
    hc = transformers.AutoConfig.for_model(**config_to_hf(src.config))
    hf = transformers.AutoModelForCausalLM.from_config(hc).eval()
    missing, unexpected = hf.load_state_dict(src.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    idx, _ = left_padded()
    with torch.no_grad():
        assert (hf(input_ids=idx).logits - src(idx)[0]).abs().max() < 1e-4


def test_kv_cache_decode_equals_the_full_forward_token_by_token():
    ours = ours_from(hf_model(*CASES[1]))  # GQA 6/3, head_dim 80, llama3 scaling
    idx, mask = left_padded(T=13)
    pos, seg = left_pad_layout(mask)
    with torch.no_grad():
        full = ours.hidden(idx, positions=pos, segment_ids=seg)  # (B, T, C)
        cache = KVCache(ours.config, 3, 13)
        assert cache.k.shape == (2, 3, 3, 13, 80)  # sized by n_kv_head
        h = ours.hidden(idx[:, :6], positions=pos[:, :6], segment_ids=seg[:, :6], cache=cache)
        torch.testing.assert_close(h, full[:, :6], atol=1e-5, rtol=1e-5)
        for t in range(6, 13):
            step = ours.decode(idx[:, t : t + 1], pos[:, t : t + 1], seg[:, : t + 1], cache)  # (B, C)
            torch.testing.assert_close(step, full[:, t], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", [CASES[0], CASES[4]], ids=["llama", "qwen3"])
def test_greedy_generation_equals_transformers_generate(case):
    hf = hf_model(*case, seed=3)
    ours = ours_from(hf)
    prompts = [[5, 6, 7, 8], [9], [10, 11, 12]]
    got = generate(ours, prompts, 12, temperature=0.0)
    pad = 0
    idx = torch.full((3, 4), pad)
    mask = torch.zeros(3, 4, dtype=torch.long)
    for b, p in enumerate(prompts):
        idx[b, 4 - len(p) :] = torch.tensor(p)
        mask[b, 4 - len(p) :] = 1
    with torch.no_grad():
        want = hf.generate(
            input_ids=idx,
            attention_mask=mask,
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=None,
        )
    assert torch.equal(got.responses, want[:, 4:])


def test_packed_documents_restart_positions_and_see_only_themselves():
    ours = ours_from(hf_model(*CASES[2]))
    a, b = torch.randint(0, V, (1, 7)), torch.randint(0, V, (1, 5))
    packed = torch.cat([a, b], dim=1)  # (1, 12): two documents in one row
    positions = torch.cat([torch.arange(7), torch.arange(5)])[None]
    segments = torch.tensor([[1] * 7 + [2] * 5])
    with torch.no_grad():
        both = ours.hidden(packed, positions=positions, segment_ids=segments)
        torch.testing.assert_close(both[:, :7], ours.hidden(a), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(both[:, 7:], ours.hidden(b), atol=1e-5, rtol=1e-5)


def test_scalar_head_paths_equal_the_full_forward_in_float64():
    torch.manual_seed(2)
    cfg = LlamaConfig(
        family="qwen3",
        vocab_size=V,
        block_size=48,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=32,
        intermediate_size=40,
        tie_word_embeddings=True,
        qk_norm=True,
    )
    rm = ScalarHeadModel(cfg).double()
    with torch.no_grad():
        for p in rm.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    seqs = [[1, 2, 3, 4, 5], [1, 2, 3, 9], [1, 2, 3, 7, 7, 7], [8, 8], [8, 9, 10]]
    sb = shared_layout(seqs, [3, 2], pad_id=0)
    shared = rm(shared=sb)  # (5,)
    full = torch.stack([rm(torch.tensor([s]))[0, -1] for s in seqs])
    torch.testing.assert_close(shared, full, atol=1e-10, rtol=1e-10)
    idx, mask = left_padded(B=3, T=9)
    pos, seg = left_pad_layout(mask)
    index = torch.tensor([8, 5, 3])
    got = rm.score(idx, index, positions=pos, segment_ids=seg)
    want = rm(idx, positions=pos, segment_ids=seg)[torch.arange(3), index]
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    tail = rm.trunk.hidden(idx, positions=pos, segment_ids=seg, tail=4)
    torch.testing.assert_close(tail, rm.trunk.hidden(idx, positions=pos, segment_ids=seg)[:, -4:])


def test_bad_configs_and_weights_name_what_is_wrong():
    base = hf_model(*CASES[0]).config.to_dict()
    with pytest.raises(ValueError, match="model_type 'gemma'"):
        config_from_hf({**base, "model_type": "gemma"})
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        config_from_hf({**base, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="sliding-window"):
        config_from_hf({**base, "model_type": "qwen2", "use_sliding_window": True})
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        config_from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        LlamaConfig(n_head=6, n_kv_head=4)
    ours = LlamaForCausalLM(config_from_hf(base))
    sd = dict(ours.state_dict())
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(
        ValueError, match=r"model.layers.0.self_attn.k_proj.weight: expected \(64, 384\), got \(3, 3\)"
    ):
        ours.load_weights(sd)
    del sd["model.norm.weight"]
    with pytest.raises(ValueError, match="missing.*model.norm.weight"):
        ours.load_weights(sd)


def test_parameter_count_matches_the_models_and_an_impossible_size_is_refused_before_allocating():
    from fastrlhf.models import GPTConfig
    from fastrlhf.models.families import build_model, parameter_count

    for cfg in (
        GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=16),
        GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=16, bias=False),
        LlamaConfig(vocab_size=50, n_layer=2, n_head=6, n_kv_head=2, n_embd=48, intermediate_size=40),
        LlamaConfig(
            family="qwen3",
            vocab_size=50,
            n_layer=2,
            n_head=6,
            n_kv_head=3,
            n_embd=48,
            head_dim=32,
            intermediate_size=40,
            tie_word_embeddings=False,
            attention_bias=True,
            qk_norm=True,
        ),
    ):
        assert parameter_count(cfg) == build_model(cfg).num_params()
    with pytest.raises(ValueError, match=r"needs \d+\.\d GiB for its fp32 weights.* block_size=1000000000"):
        build_model(GPTConfig(block_size=1_000_000_000))  # 256e9 parameters: refused before allocating
