#!/usr/bin/env bash
# The toy-world training job on the lent GPU (scripts/toyworld_pipeline.py does the work), in two calls:
#
#   bash scripts/device_toyworld.sh start   # the real run in the background (survives the call); SMOKE=1 runs the
#                                           # smoke run (every phase, a few steps) in the foreground first
#   bash scripts/device_toyworld.sh poll    # wait (<= POLL_S, default 540 s) for the real run; copy what exists
#                                           # (weights, reports) to $OUT
#
# Through the device tool from the repo root, carrying .whl (diffusers + av wheels: the image has neither;
# `bash scripts/fetch_device_wheels.sh` puts them there).
# A machine goes back 30 s after a call ends, killing the background job: issue each `poll` at once (every poll
# also copies what exists so far to $OUT, so a lost machine loses at most the phases in flight).
# The job runs from a snapshot of the repo (/tmp/tw/repo), so a re-sent working tree cannot change it mid-run.
set -uo pipefail
export PYTHONUNBUFFERED=1
MODE=${1:-start}
TW=${TW:-/tmp/tw}
OUT=${OUT:-$TW/out}
POLL_S=${POLL_S:-540}
mkdir -p "$TW" "$OUT"

setup() {
  if ! python3 -c "import diffusers, av" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    # a wheel re-packed as .tar.xz of its installed files (av: 35 MB as a wheel, 25 MB so) to fit the carry limit
    for t in .whl/*.tar.xz; do [ -f "$t" ] && tar xJf "$t" -C /tmp/site; done
  fi
  export PYTHONPATH=/tmp/site:$TW/pkg${PYTHONPATH:+:$PYTHONPATH}
  if [ ! -d "$TW/repo" ]; then
    mkdir -p "$TW/repo" "$TW/pkg/ttt_video"
    cp -a . "$TW/repo/"
    echo "__path__ = ['$TW/repo']" > "$TW/pkg/ttt_video/__init__.py"
  fi
}

copy_out() {
  if [ -f "$TW/full/ALL_DONE" ]; then
    cp -f "$TW/full/export/"* "$OUT/" 2>/dev/null
  elif [ -d "$TW/full" ]; then  # still running (or died): what exists so far, so a new lease can continue
    rm -rf "$TW/partial" && python3 "$TW/repo/scripts/toyworld_pipeline.py" --work "$TW/full" --export "$TW/partial" --pack-only >/dev/null 2>&1
    cp -f "$TW/partial/"* "$OUT/" 2>/dev/null
  fi
  tail -n 40 "$TW/full.log" > "$OUT/full-tail.log" 2>/dev/null
  tar czf "$OUT/smoke.tar.gz" -C "$TW" smoke.log smoke/timings.json smoke/logs 2>/dev/null
  ls -la "$OUT"
}

setup
if [ "$MODE" = start ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton, diffusers, av; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, 'av', av.__version__)"
  cd "$TW/repo" || exit 1  # relative paths in PIPELINE_ARGS (models/...) are read from the repo's snapshot
  if [ "${SMOKE:-0}" = 1 ]; then
    python3 "$TW/repo/scripts/toyworld_pipeline.py" --work "$TW/smoke" --export "$TW/smoke/export" --smoke 2>&1 | tee "$TW/smoke.log"
    status=${PIPESTATUS[0]}
    if [ "$status" != 0 ]; then echo "SMOKE FAILED ($status)"; copy_out; exit "$status"; fi
  fi
  # NO_EVAL=1: train only (the DiT stages get the eval's time); the held-out eval then runs on a CPU.
  # PIPELINE_ARGS: more options for the pipeline, e.g. continuing the shipped models (docs/toyworld.md)
  # shellcheck disable=SC2086  # PIPELINE_ARGS is a list of options
  setsid nohup python3 "$TW/repo/scripts/toyworld_pipeline.py" --work "$TW/full" --export "$TW/full/export" \
    ${NO_EVAL:+--no-eval} ${PIPELINE_ARGS:-} > "$TW/full.log" 2>&1 < /dev/null &
  sleep 20
  tail -n 5 "$TW/full.log"
  copy_out
else
  cd "$TW" || exit 1
  for _ in $(seq 1 $((POLL_S / 10))); do
    [ -f "$TW/full/ALL_DONE" ] && break
    if ! pgrep -f "toyworld_pipeline.py --work $TW/full" >/dev/null; then echo "job is not running"; break; fi
    sleep 10
  done
  grep -E "done in|plan:|over its|failed|Error" "$TW/full.log" | tail -n 30
  # each stage's time plan and profile, and the newest step line of the stages in flight
  grep -hE "time budget|profile \(" "$TW"/full/logs/train-*.log 2>/dev/null | cut -c1-240 | tail -n 16
  for f in "$TW"/full/logs/train-*.log; do [ -f "$f" ] && echo "$(basename "$f"): $(grep -E '^step ' "$f" | tail -n 1)"; done
  copy_out
fi
