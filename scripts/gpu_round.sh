#!/usr/bin/env bash
# One GPU session's checks in one command (device time is scarce; a lent machine starts bare):
# build the CUDA kernels against the torch there, run the CUDA op tests, compute-sanitizer, then the
# benchmarks, printing short results last. Usage (repo root, on the GPU machine):
#   bash scripts/gpu_round.sh [--only gae,ppo_loss,token_logprobs,sample,attention,decode,norms] [--quick]
# Logs go to $OUT (or ./gpu_round_logs). TORCH_CUDA_ARCH_LIST defaults to this GPU's architecture.
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS=${OUT:-gpu_round_logs}
mkdir -p "$LOGS"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}

if ! $PY -m pip install --no-build-isolation --no-deps -e . > "$LOGS/build.log" 2>&1; then
  grep -m8 -B2 -A12 error "$LOGS/build.log" | head -120
  exit 1
fi
echo "built for sm ${TORCH_CUDA_ARCH_LIST}: $($PY -c 'import fastrlhf; print(fastrlhf.build_info())')"

timeout 600 $PY -m pytest -q -p no:cacheprovider tests/ops/test_cuda.py tests/ops/test_attention_cache_view.py \
  > "$LOGS/test.log" 2>&1
echo "CUDA tests: rc=$? $(tail -1 "$LOGS/test.log")"
timeout 600 bash scripts/cuda_sanitize.sh > "$LOGS/sanitize.log" 2>&1
echo "compute-sanitizer: rc=$? $(grep -E 'SUMMARY' "$LOGS/sanitize.log" | tr '\n' ' ')"
timeout 900 $PY benchmarks/bench_cuda.py "$@" 2>&1 | tee "$LOGS/bench.log" | sed -n '/^fastrlhf CUDA ops/,$p'
