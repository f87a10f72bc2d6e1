"""Checks that must run before torch's dispatcher: it routes a call by the tensors' devices, so a
CPU/CUDA (or CPU/meta) mix never reaches the C++ checks. Everything else is checked in C++."""

from __future__ import annotations

from torch import Tensor


def same_device(**tensors: Tensor | None) -> None:
    """Raise ValueError naming the first tensor whose device differs from the first one's."""
    items = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} must be on the same device as {first_name} ({first.device}); got {t.device}"
            )
