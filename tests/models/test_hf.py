import json

import pytest
import torch
from fastrlhf.models import GPT, GPTConfig
from fastrlhf.models.hf import from_hf_model, from_hf_state_dict, load_hf, save_hf, to_hf_model

transformers = pytest.importorskip("transformers")

CFG = GPTConfig(vocab_size=131, block_size=40, n_layer=2, n_head=4, n_embd=32)


def hf_model(cfg=CFG):
    c = transformers.GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="sdpa",
    )
    m = transformers.GPT2LMHeadModel(c).eval()
    with torch.no_grad():  # HF zero-inits biases and ones-inits LayerNorm: randomise so every weight matters
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def test_import_from_hf_gives_equal_logits():
    hf = hf_model()
    ours = from_hf_model(hf).eval()
    x = torch.randint(0, CFG.vocab_size, (3, 37))
    torch.testing.assert_close(ours(x)[0], hf(x).logits, atol=1e-4, rtol=0)


def test_export_to_hf_gives_equal_logits():
    ours = GPT(CFG).eval()
    hf = to_hf_model(ours)
    x = torch.randint(0, CFG.vocab_size, (2, 40))
    torch.testing.assert_close(hf(x).logits, ours(x)[0], atol=1e-4, rtol=0)
    assert hf.config._attn_implementation == "sdpa"


def test_bias_free_model_exports_with_zero_biases():
    ours = GPT(GPTConfig(**{**CFG.to_dict(), "bias": False})).eval()
    x = torch.randint(0, CFG.vocab_size, (2, 11))
    torch.testing.assert_close(to_hf_model(ours)(x).logits, ours(x)[0], atol=1e-4, rtol=0)


def test_round_trip_through_hf_safetensors_folders(tmp_path):
    ours = GPT(CFG).eval()
    save_hf(ours, tmp_path / "ours")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    x = torch.randint(0, CFG.vocab_size, (2, 13))
    torch.testing.assert_close(hf(x).logits, ours(x)[0], atol=1e-4, rtol=0)
    hf2 = hf_model()
    hf2.save_pretrained(tmp_path / "theirs")
    back = load_hf(tmp_path / "theirs").eval()
    torch.testing.assert_close(back(x)[0], hf2(x).logits, atol=1e-4, rtol=0)


def test_bare_gpt2model_state_dict_and_bad_inputs(tmp_path):
    hf = hf_model()
    bare = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    ours = from_hf_state_dict(bare, hf.config).eval()
    x = torch.randint(0, CFG.vocab_size, (1, 9))
    torch.testing.assert_close(ours(x)[0], hf(x).logits, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="tanh-GELU"):
        from_hf_state_dict(bare, {**hf.config.to_dict(), "activation_function": "relu"})
    with pytest.raises(ValueError, match="does not match the model config"):
        from_hf_state_dict(bare, {**hf.config.to_dict(), "n_embd": 64})
    save_hf(ours, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_hf(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["n_layer"] == 2
