"""safetensors files: read with errors that name the file, their sha256 (checked on load), and Hugging Face
folders of them: one `model.safetensors` or shards listed in `model.safetensors.index.json`, read lazily
one tensor at a time and written with the index transformers expects."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor

SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _damaged(path: Path, exc: Exception) -> ValueError:
    return ValueError(f"{path} is not a readable safetensors file (truncated or corrupted?): {exc}")


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
        raise _damaged(path, exc) from exc


class SafetensorsFolder(Mapping[str, Tensor]):
    """The tensors of a Hugging Face model folder, read one at a time on access (memory-mapped), so a
    loader can convert and drop each tensor before reading the next. `shapes` needs no tensor data."""

    def __init__(self, folder: str | os.PathLike) -> None:
        from safetensors import SafetensorError, safe_open

        self.folder = Path(folder)
        self.files = tensor_files(self.folder)  # {tensor name: file}
        self._handles = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for path in sorted(set(self.files.values())):
            try:
                handle = safe_open(str(path), framework="pt")
                keys = set(handle.keys())
                for name in keys:
                    self.shapes[name] = tuple(handle.get_slice(name).get_shape())
            except (SafetensorError, OSError) as exc:
                raise _damaged(path, exc) from exc
            self._handles[path] = handle
            listed = {n for n, p in self.files.items() if p == path}
            if missing := sorted(listed - keys):
                raise ValueError(f"{path} lacks tensor {missing[0]!r} that {INDEX_FILE} places there")

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.files:
            raise KeyError(f"tensor {name!r} is not in {self.folder}")
        path = self.files[name]
        try:
            return self._handles[path].get_tensor(name)
        except Exception as exc:  # the rust reader raises its own error types
            raise ValueError(f"cannot read tensor {name!r} from {path}: {exc}") from exc

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def tensor_files(folder: Path) -> dict[str, Path]:
    """{tensor name: safetensors file} of a folder, from its index when it is sharded."""
    index, single = folder / INDEX_FILE, folder / SINGLE_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{index} is not a safetensors index (a JSON object with a weight_map): {exc}"
            ) from exc
        files = {name: folder / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise FileNotFoundError(f"shard {shard.name} listed in {index} does not exist")
        return files
    if single.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(single), framework="pt") as f:
                return dict.fromkeys(f.keys(), single)
        except (SafetensorError, OSError) as exc:
            raise _damaged(single, exc) from exc
    raise FileNotFoundError(f"no weights in {folder}: neither {SINGLE_FILE} nor {INDEX_FILE} exists")


def write_safetensors_folder(
    tensors: Mapping[str, Tensor], folder: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30
) -> list[Path]:
    """Write tensors as `model.safetensors`, or as shards `model-0000i-of-0000n.safetensors` plus the index
    when they exceed max_shard_bytes (transformers' default shard size is 5 GB). Tensors that share storage
    (tied weights) are written as separate copies, which safetensors requires. Returns the files written."""
    from safetensors.torch import save_file

    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be > 0; got {max_shard_bytes}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Tensor]] = [{}]
    size, seen, total = 0, set(), 0
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        t = t.clone() if key in seen else t  # a second view of one storage
        seen.add(key)
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size, total = size + nbytes, total + nbytes
    for stale in [*folder.glob("model-*-of-*.safetensors"), folder / SINGLE_FILE, folder / INDEX_FILE]:
        stale.unlink(missing_ok=True)  # a shard left from an earlier, larger write would confuse readers
    if len(shards) == 1:
        save_file(shards[0], folder / SINGLE_FILE, metadata={"format": "pt"})
        return [folder / SINGLE_FILE]
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for shard, fname in zip(shards, names, strict=True):
        save_file(shard, folder / fname, metadata={"format": "pt"})
    weight_map = {name: fname for shard, fname in zip(shards, names, strict=True) for name in shard}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [folder / f for f in names] + [folder / INDEX_FILE]


def state_dict_dtype(tensors: Mapping[str, Tensor]) -> torch.dtype:
    """The dtype most of a state dict's floating-point elements have (config.json's `torch_dtype`)."""
    counts: dict[torch.dtype, int] = {}
    for t in tensors.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else torch.float32
