#!/usr/bin/env bash
# One short GPU call that continues the world-sd training from the newest checkpoint, measures the bar and exports.
# Carry runs/world-sd/full.pt (fp32 + optimizer, ~47 MB) if this machine has it; the committed fp16 checkpoint
# (checkpoints/world-sd) is used otherwise. Results land in $OUT (checkpoint files + the exported model + logs).
#   MINUTES=7 scripts/device_train_world_sd.sh
set -eu
MINUTES=${MINUTES:-7}
OUT=${OUT:-runs/device-out}
mkdir -p "$OUT"
python scripts/train_world_sd.py --device cuda --batch-size 256 --lr 1e-3 --max-minutes "$MINUTES" \
    --save-every-min 2 --bar-every-min 1000 2>&1 | grep -v gemm_4bit | tee "$OUT/train.log"
python scripts/train_world_sd.py --device cuda --bar 256 2>&1 | grep -v gemm_4bit | tee "$OUT/bar.log"
python scripts/train_world_sd.py --export 2>&1 | grep -v gemm_4bit | tail -1
cp -r checkpoints/world-sd "$OUT/checkpoint"
cp -r lightning_custom/assets/world-sd "$OUT/world-sd"
cp runs/world-sd/full.pt "$OUT/full.pt" 2>/dev/null || true
