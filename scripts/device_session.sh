#!/usr/bin/env bash
# The GPU checks of one lent device session, in one call of under 10 minutes (issues 5 and 6):
#  1. world-sd trained from scratch on the GPU: a longer-trained VAE (the CPU one capped the bar at about 0.91),
#     then the text encoder + UNet for $MINUTES minutes at batch 256 with a cosine decay; the bar on 256 samples;
#     export. Everything lands in $OUT/world.tgz (model folder + committed-style checkpoint) and the logs.
#  2. benchmarks/throughput.py on the SD 1.5 architecture (random weights, 512 px, batch 2, fp16): the paper's
#     every-step DVAR without caches ("before"), the defaults ("after"), then regional compilation; each stage
#     gets what is left of $BUDGET seconds. Results: $OUT/throughput.tgz.
# Needs diffusers (and peft) carried as wheels in .whl (see /work/.library/device/README.md).
#   MINUTES=3.5 BUDGET=560 bash scripts/device_session.sh
set -u
MINUTES=${MINUTES:-3.5}
BUDGET=${BUDGET:-560}
VAE_STEPS=${VAE_STEPS:-3000}
OUT=${OUT:-runs/device-out}
PY=${PY:-python3}
# Overridable only to rehearse the script on a CPU: DEVICE=cpu ARCH=embedded RES=32 PRECISION=32-true WDTYPE=float32
DEVICE=${DEVICE:-cuda} ARCH=${ARCH:-random:sd15} RES=${RES:-512} PRECISION=${PRECISION:-16-mixed}
WDTYPE=${WDTYPE:-float16} VAE_BATCH=${VAE_BATCH:-256} BATCH=${BATCH:-256} DATASET=${DATASET:-30000}
VAE_IMAGES=${VAE_IMAGES:-16384} BAR=${BAR:-256}
DIR=runs/world-sd-gpu
mkdir -p "$OUT" "$DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/device.txt"
left() { echo $((BUDGET - SECONDS)); }

world=(--device "$DEVICE" --out "$DIR/model" --checkpoint-dir "$DIR/checkpoint" --local-dir "$DIR/local")
$PY scripts/train_world_sd.py "${world[@]}" --vae-steps "$VAE_STEPS" --vae-batch-size "$VAE_BATCH" \
    --vae-images "$VAE_IMAGES" --dataset-size "$DATASET" --batch-size "$BATCH" --lr 1e-3 --max-minutes "$MINUTES" --cosine-minutes "$MINUTES" --save-every-min 1 \
    --bar-every-min 1000 2>&1 | grep -v -e gemm_4bit -e torchvision > "$OUT/world_train.log"
tail -4 "$OUT/world_train.log"
timeout 90 $PY scripts/train_world_sd.py "${world[@]}" --bar "$BAR" 2>&1 | grep "bar at" | tee -a "$OUT/world_train.log"
timeout 60 $PY scripts/train_world_sd.py "${world[@]}" --export 2>&1 | grep exported | tee -a "$OUT/world_train.log"
# the exported fp32 UNet/text encoder would pass the 16 MiB return limit; the fp16 checkpoint re-exports here
tar czf "$OUT/world.tgz" -C "$DIR" model/vae model/tokenizer model/scheduler checkpoint
echo "world done at ${SECONDS}s"

tp=(--device "$DEVICE" --arch "$ARCH" --resolution "$RES" --batch-size 2 --precision "$PRECISION" --weight-dtype "$WDTYPE"
    --steps 80 --warmup 20 --out "$DIR/throughput")
run_tp() { local t; t=$(left); [ "$t" -gt 30 ] || return 0; timeout "$t" $PY benchmarks/throughput.py "${tp[@]}" "$@" 2>&1 \
    | grep -v -e gemm_4bit -e torchvision >> "$OUT/throughput.log"; tar czf "$OUT/throughput.tgz" -C "$DIR" throughput; }
run_tp --dvar-every 10 --channels-last --tag gpu_after
run_tp --no-cache --dvar-every 1 --tag gpu_before
run_tp --dvar-every 10 --channels-last --compile regional --methods textual_inversion --tag gpu_after_regional_compile
grep -h "^|" "$DIR"/throughput/*.md 2>/dev/null
echo "all done at ${SECONDS}s"
