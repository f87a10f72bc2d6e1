"""models.lora: adapters on any family's linears; off = the base model exactly; merge/unmerge; only the
adapters train; PEFT loads our adapters (and we load PEFT's) with equal logits."""

from __future__ import annotations

import pytest
import torch
import transformers
from fastrlhf.models.config import LlamaConfig
from fastrlhf.models.llama import LlamaForCausalLM, config_to_hf
from fastrlhf.models.lora import (
    LoraConfig,
    adapter_state,
    adapters_off,
    add_lora,
    load_adapter,
    lora_enabled,
    lora_layers,
    merge_lora,
    save_adapter,
    unmerge_lora,
)

CFG = LlamaConfig(
    vocab_size=97,
    block_size=64,
    n_layer=2,
    n_head=6,
    n_kv_head=2,
    n_embd=48,
    intermediate_size=40,
    tie_word_embeddings=True,
)


def model(seed=0, **lora):
    torch.manual_seed(seed)
    m = LlamaForCausalLM(CFG).eval()
    base = {k: v.clone() for k, v in m.state_dict().items()}
    cfg = LoraConfig(r=4, alpha=8.0, **lora)
    add_lora(m, cfg)
    with torch.no_grad():  # B = 0 at the start would make every adapter test vacuous
        for layer_B in (p for n, p in m.named_parameters() if "lora_B" in n):
            layer_B.normal_(std=0.1)
    return m, cfg, base


def test_only_adapters_train_and_off_is_the_base_model_exactly():
    m, _, base = model()
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 2 * 7  # 2 layers x 7 linears x (A, B)
    x = torch.randint(0, 97, (2, 9))
    plain = LlamaForCausalLM(CFG).eval()
    plain.load_state_dict(base)
    with torch.no_grad():
        lora_enabled(m, False)
        assert torch.equal(m(x)[0], plain(x)[0])
        lora_enabled(m, True)
        assert not torch.allclose(m(x)[0], plain(x)[0], atol=1e-3)
    m.train()
    loss = m(x, torch.roll(x, -1, 1))[1]
    loss.backward()
    assert all((p.grad is not None) == p.requires_grad for p in m.parameters())


def test_merge_gives_the_same_logits_and_unmerge_restores_the_base():
    m, _, base = model()
    x = torch.randint(0, 97, (2, 9))
    want = m(x)[0]
    merge_lora(m)
    torch.testing.assert_close(m(x)[0], want, atol=1e-5, rtol=1e-5)
    unmerge_lora(m)
    for k, v in base.items():
        torch.testing.assert_close(m.state_dict()[k], v, atol=1e-6, rtol=0)


@pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
)  # peft's own call
def test_peft_loads_our_adapter_and_we_load_peft_with_equal_logits(tmp_path):
    import peft

    m, cfg, base = model()
    save_adapter(m, cfg, tmp_path / "ours")
    hf = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**config_to_hf(CFG))
    ).eval()
    hf.load_state_dict(base, strict=False)
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "ours").eval()
    x = torch.randint(0, 97, (3, 11))
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=x).logits, m(x)[0], atol=1e-4, rtol=0)
        pm.save_pretrained(tmp_path / "peft")
        back = LlamaForCausalLM(CFG).eval()
        back.load_state_dict(base)
        loaded = load_adapter(back, tmp_path / "peft")
        assert (loaded.r, loaded.alpha) == (4, 8.0)
        torch.testing.assert_close(back(x)[0], m(x)[0], atol=1e-5, rtol=0)
    assert set(adapter_state(back)) == set(adapter_state(m))


def test_bad_targets_and_folders_name_the_problem(tmp_path):
    torch.manual_seed(0)
    m = LlamaForCausalLM(CFG)
    with pytest.raises(ValueError, match=r"match no linear layer.*'gate_proj'"):
        add_lora(m, LoraConfig(targets=["c_attn"]))
    with pytest.raises(ValueError, match=r"lora.r must be an int >= 0 \(0 = no LoRA\); got -1"):
        LoraConfig(r=-1)
    with pytest.raises(ValueError, match="lora.r must be >= 1 to add adapters; got 0"):
        add_lora(m, LoraConfig(r=0))
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        load_adapter(m, tmp_path)


def test_gpt2_blocks_run_their_adapters_and_equal_the_merged_model():
    """GPT-2's blocks call their linears' weights directly for speed; an adapted linear must run its own
    forward there (full forward, KV-cache decode and the q-only / kv-only projections alike)."""
    import copy

    from fastrlhf.models import GPT, GPTConfig
    from fastrlhf.models.generate import generate
    from fastrlhf.models.lora import merge_and_unload

    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=16)).eval()
    add_lora(m, LoraConfig(r=2, alpha=4.0, targets=["c_attn", "c_proj", "c_fc"]))
    for layer in lora_layers(m):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.2)
    merged = merge_and_unload(copy.deepcopy(m)).eval()
    x = torch.randint(0, 64, (3, 11))
    with torch.no_grad():
        torch.testing.assert_close(m(x)[0], merged(x)[0], rtol=1e-5, atol=1e-5)
        with adapters_off(m):
            assert (m(x)[0] - merged(x)[0]).abs().max() > 1e-3  # the adapters do change the model
    ours = generate(m, x[:, :4], max_new_tokens=6, temperature=0.0).responses
    assert torch.equal(ours, generate(merged, x[:, :4], max_new_tokens=6, temperature=0.0).responses)
