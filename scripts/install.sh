#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs the pack with its test dependencies. Idempotent.
# TORCH_VERSION picks the torch release when torch is not installed yet (default: the CPU build on our CI disk).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" 2>/dev/null; then
  "$VPY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
"$VPY" -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
"$VPY" -c "import ttt_video.ttt_core, torch, diffusers; print('ttt-video installed: torch', torch.__version__, '| diffusers', diffusers.__version__)"
