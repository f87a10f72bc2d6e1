"""Hugging Face model folders: config.json, the weights in model.safetensors or shards named by
model.safetensors.index.json, generation_config.json; read and written. The model layer maps the config
to an architecture (models/load.py); this module only moves files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from fastrlhf.io.safetensors import read_safetensors

INDEX = "model.safetensors.index.json"
SHARD_BYTES = 2 * 2**30  # transformers' default max_shard_size is 5 GB; 2 GiB keeps a shard easy to move


def is_hf_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and ((p / "model.safetensors").is_file() or (p / INDEX).is_file())


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def read_hf_folder(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(config.json as a dict, every tensor by its HF name) of an HF model folder."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p} is not a Hugging Face model folder: config.json is missing")
    config = read_json(p / "config.json")
    if (p / "model.safetensors").is_file():
        return config, read_safetensors(p / "model.safetensors")
    if not (p / INDEX).is_file():
        raise FileNotFoundError(f"{p} holds neither model.safetensors nor {INDEX}")
    weight_map = read_json(p / INDEX).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{p / INDEX} has no weight_map")
    tensors: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if not (p / shard).is_file():
            raise FileNotFoundError(f"{p / INDEX} names the shard {shard}, which is missing")
        tensors.update(read_safetensors(p / shard))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise ValueError(f"{p / INDEX} maps tensors that no shard holds: {missing[:5]}")
    return config, tensors


def write_hf_folder(
    path: str | os.PathLike,
    config: dict[str, Any],
    tensors: dict[str, Tensor],
    generation_config: dict[str, Any] | None = None,
    shard_bytes: int = SHARD_BYTES,
) -> Path:
    """Write config.json and the tensors (one model.safetensors, or shards + index past shard_bytes)."""
    from safetensors.torch import save_file

    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    (p / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if generation_config:
        (p / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    if len(shards) == 1:
        save_file(shards[0], p / "model.safetensors", metadata={"format": "pt"})
        return p
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, p / name, metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {
        "metadata": {"total_size": total},
        "weight_map": {k: n for n, s in zip(names, shards) for k in s},
    }
    (p / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return p
