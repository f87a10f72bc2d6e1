"""HF folders and GGUF files: a sharded folder round trip that transformers loads with equal logits, a GGUF
written in the test (llama.cpp's q/k permutation, quantized tensors, its vocabulary) read back as the
same model, and the bad files named; then the real SmolLM2-135M-Instruct against transformers' own GGUF
loading (slow: it dequantizes 135M parameters)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from fastrlhf import from_pretrained, load_tokenizer
from fastrlhf.io.gguf import read_gguf, unpermute_qk
from fastrlhf.io.hf import read_hf_folder, write_hf_folder
from fastrlhf.models import generate
from fastrlhf.models.config import LlamaConfig
from fastrlhf.models.llama import LlamaForCausalLM

CFG = LlamaConfig(
    vocab_size=64,
    block_size=64,
    n_layer=2,
    n_head=4,
    n_kv_head=2,
    n_embd=32,
    intermediate_size=64,
    tie_word_embeddings=False,
)


def model(seed=0):
    torch.manual_seed(seed)
    m = LlamaForCausalLM(CFG).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def test_a_sharded_folder_round_trips_and_transformers_loads_it(tmp_path):
    m = model()
    write_hf_folder(tmp_path / "hf", m.hf_config(), m.hf_tensors(), max_shard_bytes=20_000)
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "hf").glob("model-*-of-*.safetensors"))) > 2
    back = from_pretrained(tmp_path / "hf")
    x = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(back(x)[0], m(x)[0])
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
        assert (hf(x).logits - m(x)[0]).abs().max() < 1e-4


def test_bad_hf_folders_are_named(tmp_path):
    m = model()
    write_hf_folder(tmp_path / "hf", m.hf_config(), m.hf_tensors(), max_shard_bytes=20_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shard = min(set(index["weight_map"].values()))
    data = (tmp_path / "hf" / shard).read_bytes()
    (tmp_path / "hf" / shard).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{shard} is not a readable safetensors file"):
        read_hf_folder(tmp_path / "hf")
    (tmp_path / "hf" / shard).unlink()
    with pytest.raises(FileNotFoundError, match=f"shard {shard} listed in .* does not exist"):
        read_hf_folder(tmp_path / "hf")
    write_hf_folder(tmp_path / "gemma", {**m.hf_config(), "model_type": "gemma"}, m.hf_tensors())
    with pytest.raises(ValueError, match="model_type 'gemma' is not a Llama-family model"):
        from_pretrained(tmp_path / "gemma")
    tensors = m.hf_tensors()
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    write_hf_folder(tmp_path / "shapes", m.hf_config(), tensors)
    with pytest.raises(
        ValueError, match=r"model.layers.1.mlp.up_proj.weight: expected \(64, 32\), got \(3, 3\)"
    ):
        from_pretrained(tmp_path / "shapes")
    with pytest.raises(FileNotFoundError, match="is neither a Hugging Face model folder"):
        from_pretrained(tmp_path / "nothing")


def permute(w, n_head):  # llama.cpp's convert_hf_to_gguf.py `permute`, for the test's own GGUF
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, m: LlamaForCausalLM, quant: str = "F32"):
    """The model as llama.cpp's converter writes it (permuted q/k, GGUF names), with a byte-level vocabulary."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    c = m.config
    w.add_block_count(c.n_layer)
    w.add_context_length(c.block_size)
    w.add_embedding_length(c.n_embd)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.n_kv_head)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    tokens = [
        "<|end|>",
        *[chr(ord("a") + i) for i in range(26)],
        *[f"t{i}" for i in range(c.vocab_size - 27)],
    ]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (len(tokens) - 1))
    w.add_eos_token_id(0)
    names = {
        v: k
        for k, v in {
            "token_embd.weight": "model.embed_tokens.weight",
            "output_norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight",
        }.items()
    }
    parts = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for name, t in m.state_dict().items():
        t = t.detach().clone()
        if name.endswith("q_proj.weight"):
            t = permute(t, c.n_head)
        elif name.endswith("k_proj.weight"):
            t = permute(t, c.n_kv_head)
        if name in names:
            gname = names[name]
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            module, kind = rest.rsplit(".", 1)
            gname = f"blk.{layer}.{parts[module]}.{kind}"
        array = t.numpy().astype(np.float32)
        if quant != "F32" and array.ndim == 2:
            qtype = gguf.GGMLQuantizationType[quant]
            w.add_tensor(gname, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unpermute_inverts_llama_cpps_permutation():
    w = torch.randn(12, 5)
    for n_head in (1, 2, 3):
        assert torch.equal(unpermute_qk(permute(w, n_head), n_head), w)


@pytest.mark.parametrize("quant", ["F32", "Q8_0"])
def test_a_gguf_reads_back_as_the_same_model(tmp_path, quant):
    m = model(1)
    write_gguf(tmp_path / "m.gguf", m, quant)
    ckpt = read_gguf(tmp_path / "m.gguf")
    assert ckpt.config["num_key_value_heads"] == 2 and not ckpt.config["tie_word_embeddings"]
    assert ckpt.metadata["tokenizer.ggml.model"] == "gpt2"
    back = from_pretrained(tmp_path / "m.gguf")
    x = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        err = (back(x)[0] - m(x)[0]).abs().max()
    assert err < (1e-5 if quant == "F32" else 0.05)  # Q8_0 keeps 8 bits a weight


def test_bad_gguf_files_are_named(tmp_path):
    m = model(2)
    write_gguf(tmp_path / "m.gguf", m)
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="cut.gguf is not a readable GGUF file"):
        read_gguf(tmp_path / "cut.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(ValueError, match="junk.gguf is not a readable GGUF file"):
        read_gguf(tmp_path / "junk.gguf")


SMOL_PROMPTS = [
    "What is the capital of France?",
    "Write a sentence about the sea.",
    "Give me three colors.",
    "What is 7 times 8?",
    "Say hello in Spanish.",
    "Name a famous scientist.",
    "What do bees make?",
    "Describe a cat in five words.",
]


@pytest.mark.slow
def test_smollm2_from_its_gguf_gives_transformers_logits_and_greedy_answers():
    """tests/io/test_smollm2_gguf.py shows every dequantized tensor equal to transformers' own GGUF loading;
    here transformers' LlamaForCausalLM on those tensors gives our logits and our greedy answers."""
    ours, tok = from_pretrained("smollm2-135m-instruct"), load_tokenizer("smollm2-135m-instruct")
    hf = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**ours.hf_config())
    ).eval()
    hf.load_state_dict(ours.state_dict(), strict=False)
    same = 0
    for prompt in SMOL_PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        x = torch.tensor([ids])
        with torch.no_grad():
            assert (ours(x)[0] - hf(x).logits).abs().max() < 1e-3
            want = hf.generate(
                x, max_new_tokens=8, do_sample=False, eos_token_id=tok.eot_id, pad_token_id=tok.eot_id
            )
        got = generate(ours, [ids], 8, temperature=0.0, eos_token_id=tok.eot_id)
        n = int(got.response_mask[0].sum())
        same += got.responses[0, :n].tolist() == want[0, len(ids) : len(ids) + n].tolist()
    assert same >= 7
