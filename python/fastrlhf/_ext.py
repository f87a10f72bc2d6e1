"""Loads the compiled core. Importing fastrlhf._C registers the torch.ops.fastrlhf.* ops;
without it every op falls back to its pure-PyTorch reference (correct, slower) with a warning."""

from __future__ import annotations

import warnings
from typing import Any

import torch  # noqa: F401  (libtorch must be loaded before the extension)

try:
    from fastrlhf import _C  # type: ignore[attr-defined]

    HAS_EXT = True
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    _C = None
    HAS_EXT = False
    warnings.warn(
        f"fastrlhf: the compiled extension did not load ({exc}); every op falls back to its "
        "pure-PyTorch reference, which is correct but much slower. Rebuild with `make build`.",
        RuntimeWarning,
        stacklevel=2,
    )


def build_info() -> dict[str, Any]:
    """How the extension was built (compiler, CPU paths, torch version) or why it is absent."""
    if _C is None:
        return {"extension": False}
    return {"extension": True, **_C.build_info()}
