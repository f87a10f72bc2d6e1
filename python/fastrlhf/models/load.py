"""Models from files: a fastrlhf checkpoint or run folder -> the model and its tokenizer."""

from __future__ import annotations

import os

from fastrlhf.data import load_tokenizer
from fastrlhf.io.checkpoint import STATE_FILE, read_state, read_verified, resolve_checkpoint
from fastrlhf.models.config import GPTConfig
from fastrlhf.models.gpt2 import GPT


def load_gpt(path: str | os.PathLike, name: str = "model"):
    """(GPT, tokenizer or None) from a checkpoint or run folder written by a fastrlhf trainer."""
    ckpt = resolve_checkpoint(path)
    meta = read_state(ckpt)
    try:
        model_cfg = meta["state"]["config"]["model"]
    except KeyError:
        raise ValueError(f"{ckpt / STATE_FILE} records no model config (state.config.model)") from None
    model = GPT(GPTConfig.from_dict(model_cfg))
    model.load_weights(
        read_verified(ckpt, f"{name}.safetensors", meta), source=str(ckpt / f"{name}.safetensors")
    )
    tok = load_tokenizer(ckpt / "tokenizer") if (ckpt / "tokenizer").is_dir() else None
    return model.eval(), tok
