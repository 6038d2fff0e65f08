#!/usr/bin/env bash
# One device call (issue 4): GPU correctness tests of the Triton TTT kernels, then the benchmark.
# Run through the device tool from the repo root, carrying .whl (fla wheels, see docs/performance.md):
#   bash scripts/device_kernels.sh [benchmark args...]
# Logs go to $OUT (gpu_tests.log, errors.jsonl, bench.log, bench.json).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
REPO=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# Import the repo as package `ttt_video` without running its root __init__ (ComfyUI node imports):
# a shim package whose __path__ is the repo root.
mkdir -p /tmp/pkg/ttt_video
echo "__path__ = ['$REPO']" > /tmp/pkg/ttt_video/__init__.py
export PYTHONPATH=/tmp/pkg${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used,temperature.gpu --format=csv | tee "$OUT/nvsmi.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  KERNEL_ERR_LOG="$OUT/errors.jsonl" timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider --noconftest \
    -o addopts="" -n 4 tests/gpu 2>&1 | tee "$OUT/gpu_tests.log" | grep -v "^$" | tail -40
fi
timeout "${BENCH_TIMEOUT:-400}" python3 benchmarks/bench_ttt.py --json "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log"
