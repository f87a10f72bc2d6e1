"""load_tokenizer: the one entry point that finds the right tokenizer for a path, whichever kind it is."""

from __future__ import annotations

import json
import os
from pathlib import Path

from fastrlhf.data.hf_tokenizer import HFTokenizer
from fastrlhf.data.tokenizer import CONFIG_FILE, ByteBPETokenizer, GPT2Tokenizer, Tokenizer
from fastrlhf.io.gguf import is_gguf_file, resolve_model_name


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer at path: a folder a run saved with Tokenizer.save (data folder or checkpoint; its
    tokenizer_config.json names the `kind`), a Hugging Face tokenizer or model folder (tokenizer.json), a GGUF
    file, or a model name the project knows (`smollm2-135m-instruct`)."""
    folder = resolve_model_name(path)
    if is_gguf_file(folder):
        return HFTokenizer.from_gguf(folder)
    cfg_path = Path(folder) / CONFIG_FILE
    kind = json.loads(cfg_path.read_text()).get("kind", "hf") if cfg_path.is_file() else "hf"
    if kind == "hf" and (Path(folder) / "tokenizer.json").is_file():
        return HFTokenizer.from_folder(folder)
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"no tokenizer in {folder}: {CONFIG_FILE} is missing (and there is no HF tokenizer.json)"
        )
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "bpe":
        from tokenizers import Tokenizer as Backend

        return ByteBPETokenizer(Backend.from_file(str(Path(folder) / "tokenizer.json")))
    raise ValueError(
        f"{cfg_path}: unknown tokenizer kind {kind!r}; expected 'gpt2' or 'bpe', or an HF tokenizer.json"
    )
