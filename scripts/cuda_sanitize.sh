#!/usr/bin/env bash
# compute-sanitizer memcheck and racecheck over every CUDA kernel on small shapes (scripts/cuda_smoke.py).
# Needs a GPU, compute-sanitizer on PATH (or in $CUDA_HOME/bin) and fastrlhf built with its CUDA kernels.
# Exit status: non-zero if either tool reports an error.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SAN=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
for tool in memcheck racecheck; do
  echo "== compute-sanitizer --tool $tool"
  # torch's caching allocator hides out-of-bounds accesses inside its pooled blocks: allocate exactly
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" --error-exitcode 1 --target-processes all \
    "$PY" scripts/cuda_smoke.py
done
echo "compute-sanitizer: memcheck and racecheck clean"
