#!/usr/bin/env bash
# One device call (issue 4): build the paper's ThunderKittens TTT-MLP kernels (scripts/build_ttt_tk.py), check
# them against our float64 reference and time them beside ours and fla's Gated DeltaNet (benchmarks/bench_tk.py),
# or with BENCH=block time one CogVideoX-5B block with each global layer (benchmarks/bench_block.py).
# Run through the device tool from the repo root, carrying .thirdparty (their clone, git-ignored) and the fla wheels
# (and the diffusers wheel for BENCH=block; scripts/fetch_device_wheels.sh):
#   [BENCH=block] bash scripts/device_tk.sh [bench_tk.py / bench_block.py args...]
# Logs go to $OUT: nvsmi.txt, tk_build.log, warm.log, tk.log + tk.json (or block.log + block.json).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
REPO=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
mkdir -p /tmp/pkg/ttt_video
echo "__path__ = ['$REPO']" > /tmp/pkg/ttt_video/__init__.py
export PYTHONPATH=/tmp/pkg${PYTHONPATH:+:$PYTHONPATH}
export FLA_CACHE_RESULTS=0
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used --format=csv | tee "$OUT/nvsmi.txt"
nvcc --version | tail -2
t0=$(date +%s)
# Compile our kernels and fla's while nvcc builds theirs, at a small shape with the timed shape's integer
# specialisations: 3,072 tokens for bench_tk's 351,232 (N, N/16 and N/64 multiples of 16; N/1024 not), 2,112 for
# the 5B block's 346,304 (N a multiple of 16; N/16 and N/64 not).
BENCH=${BENCH:-tk}
WARM_TOKENS=$([ "$BENCH" = block ] && echo 2112 || echo 3072)
timeout 300 python3 benchmarks/bench_ttt.py --tokens "$WARM_TOKENS" --reps 1 --skip linear,torch,sdpa,gla \
  > "$OUT/warm.log" 2>&1 &
MAX_JOBS=16 timeout 400 python3 scripts/build_ttt_tk.py --build /tmp/ttt_tk_build > "$OUT/tk_build.log" 2>&1
echo "ttt-tk build rc $? after $(( $(date +%s) - t0 )) s"
grep -E "error|spill|Used [0-9]+ registers|built" "$OUT/tk_build.log" | head -12
wait
echo "warm-up done after $(( $(date +%s) - t0 )) s"
grep -iE "error|Traceback" "$OUT/warm.log" | head -5
if [ "$BENCH" = block ]; then
  timeout "${BENCH_TIMEOUT:-420}" python3 benchmarks/bench_block.py --tk-build /tmp/ttt_tk_build \
    --json "$OUT/block.json" "$@" 2>&1 | tee "$OUT/block.log"
else
  timeout "${BENCH_TIMEOUT:-420}" python3 benchmarks/bench_tk.py --build /tmp/ttt_tk_build --json "$OUT/tk.json" \
    "$@" 2>&1 | tee "$OUT/tk.log"
fi
