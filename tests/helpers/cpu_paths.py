"""The kernels' CPU code paths (fastrlhf._C.set_cpu_path) in tests: skip a path this CPU cannot run (the
development and CI machines differ: some are AVX2-only), run code on a path, restore the one before."""

import contextlib

import fastrlhf
import pytest


def require(path: str) -> None:
    supported = fastrlhf.build_info()["cpu_paths_supported"]
    if path not in supported:
        pytest.skip(f"this CPU lacks the {path} path (it runs {', '.join(supported)})")


@contextlib.contextmanager
def on_path(path: str):
    require(path)
    before = fastrlhf.build_info()["cpu_path"]
    fastrlhf._ext._C.set_cpu_path(path)
    try:
        yield path
    finally:
        fastrlhf._ext._C.set_cpu_path(before)


def avx2_and_avx512(fn):
    """[fn() on the AVX2 path, fn() on the AVX-512 path]; skips where the CPU has no AVX-512."""
    require("avx512")
    out = []
    for path in ("avx2", "avx512"):
        with on_path(path):
            out.append(fn())
    return out
