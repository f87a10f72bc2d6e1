#!/usr/bin/env bash
# The CPU ops under AddressSanitizer + UndefinedBehaviorSanitizer (issue 22).
#
# Builds fastrlhf._C with FASTRLHF_SANITIZE=ON into build/sanitize (incremental; the editable install and
# its build/ dir are untouched), assembles a package tree there (python/fastrlhf + the sanitized _C), and
# runs pytest on the given tests (default: the CPU op tests, see below) importing that tree. Python and
# torch are not instrumented, so the sanitizer runtimes are LD_PRELOADed; leaks are not checked (CPython
# and torch keep allocations alive at exit by design). Any report fails the run: ASan aborts on its first
# error, and UBSan does too (halt_on_error=1). Exit status: pytest's.
#
#   scripts/sanitize.sh                     # the default selection
#   scripts/sanitize.sh --durations=10      # the default selection, with pytest options
#   scripts/sanitize.sh tests/ops/test_gae.py -k masked
#   scripts/sanitize.sh --canary            # checks the harness: must abort with heap-use-after-free
# Env: PYTHON (default .venv/bin/python), JOBS (default 2), CXX (default g++, to match the runtimes).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
BUILD="$ROOT/build/sanitize"
CXX="${CXX:-g++}"

# Each op's tests, less what adds minutes under the sanitizers without adding code paths: torch.compile
# (dynamo is pure Python), subprocess runs (they would import the unsanitized install), thread-count
# comparisons at full vocabulary size, and the CUDA / nvcc files (nothing CUDA is built here).
DEFAULT_TESTS=(
  tests/ops/test_gae.py tests/ops/test_token_logprobs.py tests/ops/test_ppo_loss.py
  tests/ops/test_attention.py tests/ops/test_attention_cache_view.py tests/ops/test_sample.py
  tests/ops/test_linear.py tests/ops/test_linear_ce.py tests/ops/test_gelu.py tests/ops/test_fuzz.py
  tests/ops/test_rms_norm.py tests/ops/test_swiglu.py tests/ops/test_rope.py tests/ops/test_policy_loss.py
  -k "not compile and not baseline and not thread_count and not independent_of_thread and not philox_header"
)
# Arguments that start with a path replace the selection; others (options) are added to it.
if [ "${1:-}" != --canary ] && { [ $# -eq 0 ] || [ ! -e "$1" ]; }; then set -- "${DEFAULT_TESTS[@]}" "$@"; fi

PYBIND11_DIR="$("$PY" -c 'import pybind11; print(pybind11.get_cmake_dir())')"
BIN="$(dirname "$PY")"  # the venv's cmake and ninja (make build installs them), else the system's
CMAKE="$BIN/cmake" && [ -x "$CMAKE" ] || CMAKE=cmake
NINJA="$BIN/ninja" && [ -x "$NINJA" ] || NINJA="$(command -v ninja || true)"
GEN=() && [ -z "$NINJA" ] || GEN=(-G Ninja -DCMAKE_MAKE_PROGRAM="$NINJA")
"$CMAKE" -S "$ROOT" -B "$BUILD" "${GEN[@]}" -DCMAKE_BUILD_TYPE= -DCMAKE_CXX_COMPILER="$CXX" \
  -DFASTRLHF_SANITIZE=ON -DPython_EXECUTABLE="$PY" -Dpybind11_DIR="$PYBIND11_DIR" >"$BUILD.configure.log" 2>&1 \
  || { cat "$BUILD.configure.log"; exit 1; }
"$CMAKE" --build "$BUILD" -j "${JOBS:-2}"

# The package tree: the Python sources as they are now, and the sanitized extension.
PKG="$BUILD/pkg"
rm -rf "$PKG" && mkdir -p "$PKG"
cp -r "$ROOT/python/fastrlhf" "$PKG/"
find "$PKG" -name '_C*.so' -delete
cp "$BUILD"/_C*.so "$PKG/fastrlhf/"

ASAN_LIB="$("$CXX" -print-file-name=libasan.so)"
UBSAN_LIB="$("$CXX" -print-file-name=libubsan.so)"
for lib in "$ASAN_LIB" "$UBSAN_LIB"; do
  [ -f "$lib" ] || { echo "sanitize.sh: $lib not found (install the compiler's sanitizer runtimes)" >&2; exit 2; }
done

# The baseline-ISA kernels (FASTRLHF_CPU_PATH=base, picked once per process) get the fuzz tests first,
# which reach every op; then the default (AVX2 where the CPU has it) path gets the selection.
if [ "${1:-}" != --canary ] && [ -z "${FASTRLHF_CPU_PATH:-}" ] && [ "${SANITIZE_BASE:-1}" = 1 ]; then
  FASTRLHF_CPU_PATH=base SANITIZE_BASE=0 "$0" tests/ops/test_fuzz.py || exit $?
fi
cd "$ROOT"
export LD_PRELOAD="$ASAN_LIB:$UBSAN_LIB${LD_PRELOAD:+:$LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="halt_on_error=1:abort_on_error=1:print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export FASTRLHF_SANITIZED_PKG="$PKG"
# An editable install registers an import hook that would win over PYTHONPATH: drop it, import the tree.
exec "$PY" - "$@" <<'PYEOF'
import os, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__]
sys.path.insert(0, os.environ["FASTRLHF_SANITIZED_PKG"])
import fastrlhf
assert fastrlhf.__file__.startswith(os.environ["FASTRLHF_SANITIZED_PKG"]), fastrlhf.__file__
print(f"sanitize.sh: fastrlhf from {os.path.dirname(fastrlhf.__file__)}", flush=True)
if sys.argv[1:] == ["--canary"]:  # is the harness live? _C must be instrumented, and a bad read must abort
    import ctypes, glob
    so = open(glob.glob(os.path.join(os.path.dirname(fastrlhf.__file__), "_C*.so"))[0], "rb").read()
    for sym in (b"__asan_report_load", b"__ubsan_handle_"):
        assert sym in so, f"_C is not instrumented: no {sym.decode()}* symbol"
    print("sanitize.sh: _C is instrumented; reading freed memory now, which must abort", flush=True)
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    p = libc.malloc(64)
    libc.free(p)
    ctypes.string_at(p, 64)  # ASan's memcpy interceptor: heap-use-after-free
    sys.exit("sanitize.sh: the use-after-free went unreported")
import pytest
# --capture=sys: pytest's default fd capture would swallow a report written to fd 2 by an aborting process
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "--capture=sys", *sys.argv[1:]]))
PYEOF
