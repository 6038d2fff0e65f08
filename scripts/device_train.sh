#!/usr/bin/env bash
# Short training run of one stage with random weights: step time, tokens/s, peak memory (issue 5).
#
#   bash scripts/device_train.sh [PRESET] [TRAINABLE] [STEPS] [SEGMENTS]
#     PRESET     cogvideox-5b (default) | tiny
#     TRAINABLE  ttt_qkvo (default: the 9/18/30/63-s stages' set) | all (the 3-s stage's set) | ttt
#     STEPS      optimiser steps to run (default 6; the first one includes warm-up and is left out of the means)
#     SEGMENTS   3-s segments per video (default 1 = the 3-s stage: 13 latent frames, 17,776 tokens for 5B)
#   Extra settings through the environment: TRAIN_SET="memory.cpu_offload=true optimizer.foreach=true"
#
# Memory (5B, one process): every parameter fp32 (master weights) = 7.2 B x 4 B = 29 GB. Trainable ones add
# fp32 gradients (4 B) and AdamW moments (8 B): "all" = 7.2 B x 16 B = 115 GB (does not fit an 80 GB H100;
# it fits a 139 GB H200 only with ~20 GB left for activations), "ttt_qkvo" = 3.2 B trainable x 16 B + 4.0 B
# frozen x 4 B = 68 GB, which fits an H100 with per-block activation checkpointing. Hence the default.
#
# Through the device tool, from the repo root, carrying .whl (diffusers wheel: the device image has none):
#   bash scripts/device_train.sh cogvideox-5b ttt_qkvo 6
# Writes $OUT/train.log, $OUT/summary.json, $OUT/metrics.jsonl and prints a final table. Runs on CPU too
# (no GPU: gloo + fp32), which is how its logic is tested here: bash scripts/device_train.sh tiny all 3
set -uo pipefail
export PYTHONUNBUFFERED=1
PRESET=${1:-cogvideox-5b}
TRAINABLE=${2:-ttt_qkvo}
STEPS=${3:-6}
SEGMENTS=${4:-1}
OUT=${OUT:-/tmp/device_train_out}
WORK=${WORK:-$(mktemp -d /tmp/device_train.XXXXXX)}
mkdir -p "$OUT" "$WORK"
REPO=$PWD
PY=${PYTHON:-python3}

if ! "$PY" -c "import diffusers" 2>/dev/null && ls .whl/diffusers-*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/diffusers-*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$PY" -c "import ttt_video" 2>/dev/null; then
  # import the repo as package `ttt_video` without installing it (shim whose __path__ is the repo root)
  mkdir -p "$WORK/pkg/ttt_video"
  echo "__path__ = ['$REPO']" > "$WORK/pkg/ttt_video/__init__.py"
  export PYTHONPATH=$WORK/pkg${PYTHONPATH:+:$PYTHONPATH}
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/nvsmi.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

# one random item of the preset's latent / text shape, in the prepared-data format
"$PY" - "$PRESET" "$SEGMENTS" "$WORK/data" <<'EOF' || exit 1
import sys, torch
from pathlib import Path
from ttt_video.ttt_core.config import preset
from ttt_video.ttt_core.geometry import latent_frames_for_segments
from ttt_video.ttt_core.training.data import write_dataset_info, write_item, write_manifest
name, segments, root = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
cfg = preset(name)
g = torch.Generator().manual_seed(0)
F = latent_frames_for_segments(segments)
mean = torch.randn(F, cfg.in_channels, cfg.sample_height, cfg.sample_width, generator=g)
dist = torch.cat([mean, torch.full_like(mean, -6.0)], 1)
text = torch.randn(segments, cfg.max_text_seq_length, cfg.text_embed_dim, generator=g)
write_manifest(root / "manifest.jsonl", [write_item(root, "random0", dist, text)])
write_dataset_info(root, {"scaling_factor": 0.7, "latent_channels": cfg.in_channels})
g = cfg.geometry(segments)
print(f"data: {segments} segment(s), {F} latent frames, {g.video_tokens} video + {g.text_tokens} text = {g.total_tokens} tokens")
EOF

SETS=(--set "data.manifest=\"$WORK/data/manifest.jsonl\"" --set "checkpoint.dir=\"$WORK/run\""
      --set "stage.trainable=\"$TRAINABLE\"" --set "stage.segments=$SEGMENTS" --set "model.init_from=[]"
      --set "checkpoint.export=false" --set "logging.tensorboard=false" --set "logging.log_every=1"
      --set "data.text_dropout=0.0")
for kv in ${TRAIN_SET:-}; do SETS+=(--set "$kv"); done

"$PY" -m ttt_video.ttt_core.training.cli train --config "configs/$PRESET/3s.toml" "${SETS[@]}" \
  --max-steps "$STEPS" --no-final-checkpoint --summary-json "$OUT/summary.json" 2>&1 | tee "$OUT/train.log"
rc=${PIPESTATUS[0]}
cp "$WORK/run/metrics.jsonl" "$OUT/metrics.jsonl" 2>/dev/null
if [ "$rc" != 0 ]; then echo "training failed (exit $rc)"; exit "$rc"; fi

"$PY" - "$OUT/summary.json" "$OUT/metrics.jsonl" "$PRESET" "$TRAINABLE" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
m = [json.loads(l) for l in open(sys.argv[2])]
steady = m[1:] if len(m) > 1 else m
mean = lambda k: sum(r[k] for r in steady) / len(steady)
rows = [
    ("preset / trainable set", f"{sys.argv[3]} / {sys.argv[4]}"),
    ("parameters total / trainable", f"{s['total_params'] / 1e6:,.1f} M / {s['trainable_params'] / 1e6:,.1f} M"),
    ("tokens per sample", f"{s['tokens_per_sample']:,}"),
    ("steps run (first excluded from means)", f"{len(m)}"),
    ("first step time", f"{m[0]['step_time_s']:.2f} s"),
    ("mean step time", f"{mean('step_time_s'):.2f} s"),
    ("tokens/s (mean)", f"{mean('tokens_per_s'):,.0f}"),
    ("peak memory (GPU allocated, or host RSS)", f"{s['peak_memory_gb']:.1f} GiB"),
    ("model build", f"{s['build_s']:.1f} s"),
    ("loss first -> last", f"{m[0]['loss']:.4f} -> {m[-1]['loss']:.4f}"),
]
w = max(len(a) for a, _ in rows)
print("\n| " + "measure".ljust(w) + " | value |\n|" + "-" * (w + 2) + "|-------|")
for a, b in rows:
    print(f"| {a.ljust(w)} | {b} |")
EOF
