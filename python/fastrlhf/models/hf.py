"""Hugging Face GPT-2 interop: GPT2LMHeadModel state dicts and save_pretrained-style safetensors folders,
both directions. transformers is needed only for the *_hf_model helpers (imported lazily).

HF's GPT-2 uses Conv1D, whose weight is (in, out): the transpose of nn.Linear's (out, in)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from fastrlhf.models.config import GPTConfig
from fastrlhf.models.gpt2 import _CONV1D, GPT, config_to_hf_dict, state_dict_to_hf

_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers some transformers versions save


def config_from_hf(hf: dict[str, Any] | Any) -> GPTConfig:
    """GPTConfig from a GPT2Config (or its dict / config.json)."""
    d = hf if isinstance(hf, dict) else hf.to_dict()
    act = d.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"only tanh-GELU GPT-2 models are supported; config has activation_function={act!r}")
    return GPTConfig(
        vocab_size=d["vocab_size"],
        block_size=d["n_positions"],
        n_layer=d["n_layer"],
        n_head=d["n_head"],
        n_embd=d["n_embd"],
        dropout=d.get("resid_pdrop", 0.0),
        bias=True,
        layer_norm_eps=d.get("layer_norm_epsilon", 1e-5),
    )


def state_dict_from_hf(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our names and layouts from a GPT2LMHeadModel (or bare GPT2Model) state dict."""
    out = {}
    for k, v in sd.items():
        if k.endswith(_BUFFERS) or k == "lm_head.weight":
            continue  # lm_head is tied to wte
        name = k if k.startswith("transformer.") else "transformer." + k
        out[name] = v.t().contiguous() if k.endswith(_CONV1D) else v
    return out


def from_hf_state_dict(sd: dict[str, Tensor], hf_config: dict[str, Any] | Any) -> GPT:
    gpt = GPT(config_from_hf(hf_config))
    gpt.load_weights(state_dict_from_hf(sd), source="Hugging Face GPT-2 state dict")
    return gpt


def save_hf(gpt: GPT, folder: str | os.PathLike) -> None:
    """Write config.json + model.safetensors as GPT2LMHeadModel.save_pretrained lays them out."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = state_dict_to_hf(gpt)
    del sd["lm_head.weight"]  # tied: save_pretrained stores it once too
    save_file(
        {k: v.contiguous() for k, v in sd.items()}, folder / "model.safetensors", metadata={"format": "pt"}
    )
    (folder / "config.json").write_text(json.dumps(config_to_hf_dict(gpt.config), indent=2))


def load_hf(folder: str | os.PathLike) -> GPT:
    """A GPT from a save_pretrained-style GPT-2 folder (config.json + model.safetensors)."""
    from fastrlhf.io.safetensors import read_safetensors

    folder = Path(folder)
    hf_config = json.loads((folder / "config.json").read_text())
    return from_hf_state_dict(read_safetensors(folder / "model.safetensors"), hf_config)


def to_hf_model(gpt: GPT):
    """A transformers GPT2LMHeadModel (sdpa attention) with gpt's weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(**config_to_hf_dict(gpt.config))).to(next(gpt.parameters()).device)
    hf.load_state_dict(state_dict_to_hf(gpt))
    return hf.eval()


def from_hf_model(hf) -> GPT:
    return from_hf_state_dict(hf.state_dict(), hf.config)
