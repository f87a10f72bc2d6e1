"""safetensors files: read with errors that name the file, and their sha256 (checked on load)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from torch import Tensor


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_safetensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """All tensors of a safetensors file, with an error that names the file when it is damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    try:
        return load_file(path)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise ValueError(
            f"{path} is not a readable safetensors file (truncated or corrupted?): {exc}"
        ) from exc
