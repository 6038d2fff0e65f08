#!/usr/bin/env bash
# Download, on this (networked) machine, the wheels the lent GPU machine lacks into ./.whl (git-ignored), so a
# device call can carry them: diffusers + av for the toy-world job (scripts/device_toyworld.sh), fla for the
# kernel benchmark's baselines (scripts/device_kernels.sh). The device image has python 3.12, torch, triton and
# transformers, but no network. ~43 MB in all (the carry limit is 64 MiB with the working tree).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl diffusers==0.42.1 av==18.1.0 fla-core==0.6.0 flash-linear-attention==0.6.0
ls -la .whl
