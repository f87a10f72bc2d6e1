"""Models from files: a fastrlhf checkpoint or run folder -> the model and its tokenizer, by the model
record every trainer writes (io/checkpoint.py)."""

from __future__ import annotations

import os
from typing import Any

from fastrlhf.data import load_tokenizer
from fastrlhf.io.checkpoint import (
    STATE_FILE,
    model_record,
    read_model_record,
    read_state,
    read_verified,
    resolve_checkpoint,
)
from fastrlhf.models.families import arch_of, build_model, config_from_dict
from fastrlhf.models.heads import ScalarHeadModel
from fastrlhf.models.transformer import CausalLM


def lm_record(model: CausalLM) -> dict[str, Any]:
    """The checkpoint record of a language model (io.checkpoint.model_record)."""
    return model_record(arch_of(model.config), model.config.to_dict(), "lm")


def scalar_record(model: ScalarHeadModel) -> dict[str, Any]:
    """The checkpoint record of a reward or value model."""
    return model_record(arch_of(model.config), model.config.to_dict(), "scalar")


def load_model(path: str | os.PathLike, name: str = "model"):
    """(language model, tokenizer or None) from a checkpoint or run folder written by a fastrlhf trainer."""
    ckpt = resolve_checkpoint(path)
    meta = read_state(ckpt)
    record = read_model_record(meta, ckpt / STATE_FILE)
    if record["head"] != "lm":
        raise ValueError(f"{path} holds a reward model (a scalar head), not a language model")
    model = build_model(config_from_dict(record["arch"], record["config"]))
    model.load_weights(
        read_verified(ckpt, f"{name}.safetensors", meta), source=str(ckpt / f"{name}.safetensors")
    )
    tok = load_tokenizer(ckpt / "tokenizer") if (ckpt / "tokenizer").is_dir() else None
    return model.eval(), tok


def load_scalar_model(path: str | os.PathLike) -> tuple[ScalarHeadModel, Any]:
    """(reward model, tokenizer or None) from a checkpoint or run folder written by `python -m fastrlhf rm`."""
    ckpt = resolve_checkpoint(path)
    meta = read_state(ckpt)
    record = read_model_record(meta, ckpt / STATE_FILE)
    if record["head"] != "scalar":
        raise ValueError(
            f"{path} holds a language model, not a reward model: give the folder `python -m fastrlhf rm` wrote"
        )
    rm = ScalarHeadModel(config_from_dict(record["arch"], record["config"]))
    rm.load_weights(read_verified(ckpt, "model.safetensors", meta), source=str(ckpt / "model.safetensors"))
    tok = load_tokenizer(ckpt / "tokenizer") if (ckpt / "tokenizer").is_dir() else None
    return rm.eval(), tok
