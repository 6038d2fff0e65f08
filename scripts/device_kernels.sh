#!/usr/bin/env bash
# One device call (issue 4): GPU correctness tests of the Triton TTT kernels, optional probes of kernel
# variants (each in its own process: checked, then timed), then the benchmark table.
# Run through the device tool from the repo root, carrying .whl (fla wheels: bash scripts/fetch_device_wheels.sh):
#   PROBE='mlp_fwd:num_warps=8;...' [PROBE_SHAPES='7616:12;351168:24'] [GPU_TESTS_K=split] [SKIP_WHEELS=1] [PROBE_WARM_TOKENS=2112] [NCU_TOKENS=21952] [SKIP_BENCH=1] [SKIP_TESTS=1] \
#     bash scripts/device_kernels.sh [benchmark args...]
# Logs go to $OUT (nvsmi.txt, gpu_tests.log, errors.jsonl, probe.log or probe-<tokens>x<heads>.log, bench.log, bench*.json).
# TEST_TIMEOUT (default 450 s): the whole GPU suite took 401 s in session 12 before its long cases took 5 draws
# each; a call has 600 s, so run the suite alone (SKIP_BENCH=1) and the table in a call of its own.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
REPO=$PWD
# SKIP_WHEELS=1: leave /tmp/site alone (a toy-world job started in the same call imports from it)
if [ "${SKIP_WHEELS:-0}" != 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
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
  KERNEL_ERR_LOG="$OUT/errors.jsonl" timeout "${TEST_TIMEOUT:-450}" python3 -m pytest -q -p no:cacheprovider --noconftest \
    -o addopts="" -n 4 ${GPU_TESTS_K:+-k "$GPU_TESTS_K"} tests/gpu > "$OUT/gpu_tests.log" 2>&1
  grep -E "passed|failed|Error|error:" "$OUT/gpu_tests.log" | grep -v "^E  " | tail -8
  python3 - "$OUT/errors.jsonl" <<'PY'
import json, sys
try:
    for line in open(sys.argv[1]):
        r = json.loads(line)
        e = r["errs"]
        print("errs", r["case"], "max %.1e (%s)" % (max(e.values()), max(e, key=e.get)))
except FileNotFoundError:
    print("no error log")
PY
fi
if [ -n "${PROBE:-}" ]; then
  if [ -n "${PROBE_WARM_TOKENS:-}" ]; then
    # Compile every probe in parallel first (a small shape with the full shape's integer specialisations,
    # e.g. 2112 for 351,168); the timed probes below then load the binaries from Triton's disk cache.
    t0=$(date +%s); n=0
    IFS=';' read -ra specs <<< "$PROBE"
    for spec in "${specs[@]}"; do
      n=$((n + 1))
      timeout "${WARM_TIMEOUT:-240}" python3 benchmarks/bench_ttt.py --probe-one "$spec" --tokens "$PROBE_WARM_TOKENS" --reps 1 \
        > "$OUT/probe-warm-$n.log" 2>&1 &
    done
    wait
    echo "probe warm-up (parallel compile of $n probes) done in $(( $(date +%s) - t0 )) s"
  fi
  if [ -n "${PROBE_SHAPES:-}" ]; then
    # the same probes at several shapes, 'tokens:heads;...' (heads per direction: B = 2 stacks both)
    IFS=';' read -ra shapes <<< "$PROBE_SHAPES"
    for shape in "${shapes[@]}"; do
      tag="${shape/:/x}"
      echo "== probes at tokens:heads $shape"
      timeout "${PROBE_TIMEOUT:-300}" python3 benchmarks/bench_ttt.py --probe "$PROBE" --tokens "${shape%%:*}" \
        --heads "${shape##*:}" --json "$OUT/bench-$tag.json" "$@" 2>&1 | tee "$OUT/probe-$tag.log"
    done
  else
    timeout "${PROBE_TIMEOUT:-300}" python3 benchmarks/bench_ttt.py --probe "$PROBE" --json "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/probe.log"
  fi
fi
if [ -n "${NCU_TOKENS:-}" ]; then
  # Nsight Compute on one TTT-MLP kernel (NCU_KERNEL, a regex; the forward by default) at a slice of the sequence
  # (same per-mini-batch work).
  timeout "${NCU_TIMEOUT:-200}" ncu --kernel-name "regex:${NCU_KERNEL:-_ttt_mlp_fwd}" --launch-skip 1 --launch-count 1 --set full \
    -f -o "$OUT/ncu" python3 benchmarks/bench_ttt.py --tokens "$NCU_TOKENS" --reps 1 --skip "${NCU_SKIP:-linear,torch,fla,sdpa,bwd}" \
    --config "${NCU_CONFIG:-}" \
    > "$OUT/ncu-run.log" 2>&1
  ncu -i "$OUT/ncu.ncu-rep" --page details > "$OUT/ncu-details.txt" 2>&1
  # stall reasons (raw metrics) and, per SASS instruction, the stall samples (NCU_SOURCE=1; a large CSV)
  ncu -i "$OUT/ncu.ncu-rep" --page raw --csv 2>/dev/null | python3 -c "
import csv, sys
rows = list(csv.reader(sys.stdin))
for name, unit, val in zip(rows[0], rows[1], rows[2]):
    if 'warp_latency_issue_stalled' in name or 'pcsamp_warps_issue_stalled' in name:
        print(name, unit, val)" > "$OUT/ncu-stalls.txt" 2>&1
  [ "${NCU_SOURCE:-0}" = 1 ] && ncu -i "$OUT/ncu.ncu-rep" --page source --print-source sass --csv > "$OUT/ncu-source.csv" 2>&1
  grep -E "Duration|Throughput|Registers|Local|Stall|stall|Occupancy|L2 Hit|Issued|Warp Cycles" "$OUT/ncu-details.txt" | head -60
fi
if [ "${SKIP_BENCH:-0}" = 1 ]; then
  exit 0
fi
# fla's Triton autotuner keys exclude the sequence length: keep it from reusing a config tuned on a warm-up
# shape from its on-disk cache (the compiled binaries are still shared through Triton's cache).
export FLA_CACHE_RESULTS=0
if [ -n "${WARM_TOKENS:-}" ]; then
  # Compile every kernel first, in parallel processes at a small shape (Triton's compile is single-threaded;
  # fla's first call compiles dozens of autotune configs). WARM_TOKENS must keep the full shape's integer
  # specialisations (multiple of 16; N/16, N/64 and N/1024 not multiples of 16), e.g. 2112 for 351,168.
  t0=$(date +%s)
  for part in "linear,torch,fla,sdpa" "mlp,torch,fla,sdpa" "mlp,linear,torch,sdpa,gla" "mlp,linear,torch,sdpa,gdn"; do
    timeout "${WARM_TIMEOUT:-240}" python3 benchmarks/bench_ttt.py --tokens "$WARM_TOKENS" --reps 1 --skip "$part" \
      > "$OUT/warm-${part//,/_}.log" 2>&1 &
  done
  wait
  echo "warm-up (parallel compile) done in $(( $(date +%s) - t0 )) s"
  tail -n 3 "$OUT"/warm-*.log | grep -iE "error|Traceback|fail" | head -5
fi
timeout "${BENCH_TIMEOUT:-400}" python3 benchmarks/bench_ttt.py --json "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log"
