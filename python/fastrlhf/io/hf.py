"""Hugging Face model folders: config.json (a dict; the models layer maps it to its own config), the weights
(`model.safetensors` or shards with `model.safetensors.index.json`, read lazily) and generation_config.json,
read and written in the layout `transformers.AutoModelForCausalLM.from_pretrained` loads."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor

from fastrlhf.io.safetensors import INDEX_FILE, SINGLE_FILE, SafetensorsFolder, write_safetensors_folder

CONFIG_FILE, GENERATION_CONFIG_FILE = "config.json", "generation_config.json"


class SavesFiles(Protocol):
    def save(self, folder: str | os.PathLike) -> None: ...


@dataclass
class HFFolder:
    """What an HF model folder holds. tensors is lazy: `tensors[name]` reads that one tensor."""

    path: Path
    config: dict[str, Any]
    tensors: SafetensorsFolder
    generation_config: dict[str, Any] | None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file, with an error that names the file when it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        # a file's content, not an argument's type: ValueError like every other damaged file
        raise ValueError(f"{path} must hold a JSON object; got {type(data).__name__}")  # noqa: TRY004
    return data


def is_hf_folder(path: str | os.PathLike) -> bool:
    """True for a folder with config.json and safetensors weights (single or sharded)."""
    p = Path(path)
    return (p / CONFIG_FILE).is_file() and ((p / SINGLE_FILE).is_file() or (p / INDEX_FILE).is_file())


def read_hf_config(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a Hugging Face model folder: {CONFIG_FILE} is missing")
    config = read_json(path)
    if "model_type" not in config:
        raise ValueError(f"{path} has no model_type; expected e.g. 'llama', 'qwen2', 'qwen3' or 'gpt2'")
    return config


def read_generation_config(folder: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(folder) / GENERATION_CONFIG_FILE
    return read_json(path) if path.is_file() else None


def read_hf_folder(folder: str | os.PathLike) -> HFFolder:
    """The config, lazy tensors and generation config of an HF model folder. Errors name the file: a missing
    config.json or shard, a truncated or corrupted safetensors file, a shard lacking a tensor its index lists."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    config = read_hf_config(folder)
    return HFFolder(folder, config, SafetensorsFolder(folder), read_generation_config(folder))


def write_hf_folder(
    folder: str | os.PathLike,
    config: Mapping[str, Any],
    tensors: Mapping[str, Tensor],
    *,
    generation_config: Mapping[str, Any] | None = None,
    tokenizer: SavesFiles | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write an HF model folder: config.json, the weights (one file or shards + index), generation_config.json
    when given, and the tokenizer's files beside them (`tokenizer.save(folder)`). The caller's config must
    already be HF's (model_type, architectures, sizes); tensors carry HF's names. Returns the folder."""
    folder = Path(folder)
    if "model_type" not in config:
        raise ValueError("config must be a Hugging Face config dict with a model_type; it has none")
    write_safetensors_folder(tensors, folder, max_shard_bytes=max_shard_bytes)
    (folder / CONFIG_FILE).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    if generation_config is not None:
        text = json.dumps(dict(generation_config), indent=2, sort_keys=True) + "\n"
        (folder / GENERATION_CONFIG_FILE).write_text(text)
    if tokenizer is not None:
        tokenizer.save(folder)
    return folder
