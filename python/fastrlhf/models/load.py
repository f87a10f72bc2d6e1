"""Models from files: a fastrlhf checkpoint or run folder -> the model and its tokenizer, by the model
record every trainer writes (io/checkpoint.py)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastrlhf.config import from_dict, to_dict
from fastrlhf.data import load_tokenizer
from fastrlhf.io.checkpoint import (
    STATE_FILE,
    model_record,
    read_model_record,
    read_state,
    read_verified,
    resolve_checkpoint,
)
from fastrlhf.io.gguf import is_gguf_file, read_gguf, resolve_model_name
from fastrlhf.io.hf import is_hf_folder, read_hf_folder
from fastrlhf.models.families import arch_of, build_model, config_from_dict
from fastrlhf.models.heads import ScalarHeadModel
from fastrlhf.models.llama import LlamaForCausalLM
from fastrlhf.models.llama import config_from_hf as llama_config_from_hf
from fastrlhf.models.lora import LoraConfig, add_lora, merge_and_unload
from fastrlhf.models.transformer import CausalLM


def lm_record(model: CausalLM) -> dict[str, Any]:
    """The checkpoint record of a language model (io.checkpoint.model_record), with its LoRA config when
    it carries adapters (models/lora.py)."""
    record = model_record(arch_of(model.config), model.config.to_dict(), "lm")
    lora = getattr(model, "lora_config", None)
    return record if lora is None else {**record, "lora": to_dict(lora)}


def scalar_record(model: ScalarHeadModel) -> dict[str, Any]:
    """The checkpoint record of a reward or value model, with its trunk's LoRA config when it has adapters."""
    record = model_record(arch_of(model.config), model.config.to_dict(), "scalar")
    lora = getattr(model.trunk, "lora_config", None)
    return record if lora is None else {**record, "lora": to_dict(lora)}


def is_pretrained_source(path: str | os.PathLike) -> bool:
    """A model from outside fastrlhf: a Hugging Face model folder, a GGUF file or a known model name."""
    p = resolve_model_name(path)
    return is_gguf_file(p) or is_hf_folder(p)


def is_run_folder(path: str | os.PathLike) -> bool:
    """A fastrlhf run folder (with `latest`) or checkpoint folder (with state.json)."""
    p = Path(path)
    return p.is_dir() and ((p / STATE_FILE).is_file() or (p / "latest").is_file())


def load_model(path: str | os.PathLike, name: str = "model"):
    """(language model, tokenizer or None) from any source the trainers start from: a checkpoint or run folder
    written by a fastrlhf trainer (`name`: which of its models), a Hugging Face model folder, a GGUF file or
    'smollm2-135m-instruct' (from_pretrained's sources, float32, with their own tokenizer)."""
    p = resolve_model_name(path)
    if is_pretrained_source(p):
        has_tok = is_gguf_file(p) or (Path(p) / "tokenizer.json").is_file()
        return from_pretrained(p), load_tokenizer(p) if has_tok else None
    try:
        ckpt = resolve_checkpoint(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{exc}; nor is it a Hugging Face model folder (config.json + safetensors), a .gguf file or a known "
            f"name ('smollm2-135m-instruct')"
        ) from None
    meta = read_state(ckpt)
    record = read_model_record(meta, ckpt / STATE_FILE)
    if record["head"] != "lm":
        raise ValueError(f"{path} holds a reward model (a scalar head), not a language model")
    model = build_model(config_from_dict(record["arch"], record["config"]))
    if "lora" in record:  # a LoRA run: its weights are the base's and the adapters'
        add_lora(model, from_dict(LoraConfig, record["lora"], "lora."))
    model.load_weights(
        read_verified(ckpt, f"{name}.safetensors", meta), source=str(ckpt / f"{name}.safetensors")
    )
    if "lora" in record:
        merge_and_unload(model)  # the next stage starts from the merged model, as from a full fine-tuning
    tok = load_tokenizer(ckpt / "tokenizer") if (ckpt / "tokenizer").is_dir() else None
    return model.eval(), tok


def load_scalar_model(path: str | os.PathLike, merge: bool = True) -> tuple[ScalarHeadModel, Any]:
    """(reward model, tokenizer or None) from a checkpoint or run folder written by `python -m fastrlhf rm`.
    A LoRA reward model comes merged into a plain trunk, or with merge=False as its adapters on the frozen
    trunk (rm.trunk.lora_config set)."""
    ckpt = resolve_checkpoint(path)
    meta = read_state(ckpt)
    record = read_model_record(meta, ckpt / STATE_FILE)
    if record["head"] != "scalar":
        raise ValueError(
            f"{path} holds a language model, not a reward model: give the folder `python -m fastrlhf rm` wrote"
        )
    rm = ScalarHeadModel(config_from_dict(record["arch"], record["config"]))
    if "lora" in record:
        add_lora(rm.trunk, from_dict(LoraConfig, record["lora"], "lora."))
    rm.load_weights(read_verified(ckpt, "model.safetensors", meta), source=str(ckpt / "model.safetensors"))
    if "lora" in record and merge:
        merge_and_unload(rm.trunk)
    tok = load_tokenizer(ckpt / "tokenizer") if (ckpt / "tokenizer").is_dir() else None
    return rm.eval(), tok


# ---- pretrained models from other places: Hugging Face folders, GGUF files, names ---------------------------
def model_from_hf(config: dict[str, Any], tensors: Mapping[str, Tensor], source: str) -> CausalLM:
    """The model an HF config.json describes, with its HF-named tensors loaded (names and shapes checked)."""
    tensors = {k: tensors[k] for k in tensors if not k.endswith("rotary_emb.inv_freq")}
    if config.get("model_type") == "gpt2":
        from fastrlhf.models.hf import from_hf_state_dict

        return from_hf_state_dict(tensors, config)
    model = LlamaForCausalLM(llama_config_from_hf(config))
    model.load_weights(tensors, source=source)
    return model


def from_pretrained(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> CausalLM:
    """The model of a Hugging Face folder (config.json + model.safetensors or a sharded index), a GGUF
    file (dequantized), a fastrlhf run/stage/checkpoint folder, or the name 'smollm2-135m-instruct'."""
    p = resolve_model_name(path)
    if is_gguf_file(p):
        ckpt = read_gguf(p)
        model = model_from_hf(ckpt.config, ckpt.tensors, str(p))
    elif is_hf_folder(p):
        folder = read_hf_folder(p)
        model = model_from_hf(folder.config, folder.tensors, str(p))
    elif is_run_folder(p):
        model = load_model(p)[0]
    else:
        raise FileNotFoundError(
            f"{path} is neither a Hugging Face model folder (config.json + safetensors), a .gguf file, a "
            f"fastrlhf run or checkpoint folder, nor a known name ('smollm2-135m-instruct')"
        )
    return model.to(dtype).eval()


def load_pretrained_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer that goes with from_pretrained(path): the HF folder's tokenizer.json, the GGUF's
    vocabulary, or a run's tokenizer/ folder."""
    p = resolve_model_name(path)
    if is_gguf_file(p) or is_hf_folder(p):
        return load_tokenizer(p)
    tok = load_model(p)[1]
    if tok is None:
        raise FileNotFoundError(f"{p} has no tokenizer/ folder")
    return tok
