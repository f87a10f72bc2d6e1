"""Token files: a 64-byte header then the ids, uint16 when the vocab fits, else uint32, read back as a
memory map (a corpus never has to fit in memory). The header makes a file self-describing and lets a
truncated file be caught at open time.

    header: magic b"FRTOKEN1", itemsize u64, vocab_size u64, n_tokens u64, zero padding to 64 bytes"""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

MAGIC, HEADER = b"FRTOKEN1", 64


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def write_tokens(path: str | os.PathLike, ids: np.ndarray | list[int], vocab_size: int) -> Path:
    """Write ids atomically (temporary file + rename); ids outside [0, vocab_size) are an error."""
    path = Path(path)
    arr = np.asarray(ids, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"ids must be 1-D; got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise ValueError(f"token ids must be in [0, {vocab_size}); got ids in [{arr.min()}, {arr.max()}]")
    dtype = token_dtype(vocab_size)
    header = struct.pack("<8sQQQ", MAGIC, dtype.itemsize, vocab_size, arr.size).ljust(HEADER, b"\0")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(header)
        f.write(arr.astype(dtype).tobytes())
    os.replace(tmp, path)
    return path


class TokenFile:
    """A read-only memory map of a token file: .tokens (N,) uint16/uint32, .vocab_size."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"token file {self.path} does not exist (run `python -m fastrlhf data` first?)"
            )
        with open(self.path, "rb") as f:
            head = f.read(HEADER)
        if len(head) < HEADER or head[:8] != MAGIC:
            raise ValueError(f"{self.path} is not a fastrlhf token file (bad header)")
        _, itemsize, self.vocab_size, n = struct.unpack("<8sQQQ", head[:32])
        if itemsize not in (2, 4):
            raise ValueError(f"{self.path}: token size {itemsize} bytes in the header; expected 2 or 4")
        want = HEADER + n * itemsize
        size = self.path.stat().st_size
        if size != want:
            raise ValueError(f"{self.path} is truncated or corrupted: {size} bytes, header says {want}")
        dtype = np.uint16 if itemsize == 2 else np.uint32
        self.tokens = (
            np.memmap(self.path, dtype=dtype, mode="r", offset=HEADER, shape=(n,))
            if n
            else np.zeros(0, dtype)
        )

    def __len__(self) -> int:
        return len(self.tokens)


def random_batch(
    tokens: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """x, y (B, T) int64: B windows at random offsets (drawn from generator, so a resumed run continues
    the same stream) and the same windows shifted by one token."""
    n = len(tokens) - block_size - 1
    if n < 0:
        raise ValueError(f"a token file of {len(tokens)} tokens is too short for block_size {block_size}")
    starts = torch.randint(0, n + 1, (batch_size,), generator=generator).tolist()
    window = np.stack([tokens[s : s + block_size + 1] for s in starts]).astype(np.int64)  # (B, T + 1)
    window = torch.from_numpy(window)
    return window[:, :-1], window[:, 1:]
