#!/usr/bin/env bash
# One call on one GPU (issue 15): the A/Bs of the step's speed options for Textual Inversion, DreamBooth-LoRA and
# Custom Diffusion on the SD 1.5 architecture with random weights built in-process (no download), 512 px, batch 2,
# fp16 weights under 16-mixed, DVAR every 10 steps, caches on. Each row records ms per step, the DVAR share, peak
# memory and the first step's time (which holds the compile time):
#   A  frozen fp16 UNet/VAE inside autocast (before issue 15)       --frozen-in-autocast
#   B  outside autocast (the default now)
#   C  B + channels_last                                              --channels-last
#   D  B + compile_unet: regional                                     --compile regional
#   CUDA graphs for the fixed-shape step: not implemented (not measured).
# Then "time to concept": wall time from the command to the written artifacts (model build included) of a CLI
# Textual Inversion run with DVAR on the SD 1.5 architecture (the moonshot: under 30 s).
# Results: benchmarks/results/throughput_gpu15_*.{json,md} and time_to_concept_gpu.txt (dry run: *_dryrun*).
#   bash benchmarks/gpu_throughput.sh
# Dry run on a CPU with the tiny model, a few steps (checks every command; its numbers mean nothing):
#   GPU_THROUGHPUT_DRY_RUN=1 bash benchmarks/gpu_throughput.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
out=benchmarks/results
if [[ "${GPU_THROUGHPUT_DRY_RUN:-0}" == "1" ]]; then
    suffix=_dryrun
    common=(--device cpu --arch embedded:tiny-sd --resolution 32 --batch-size 2 --precision bf16-mixed
            --weight-dtype bfloat16 --steps 5 --warmup 2 --dvar-every 2)
    cli=(--trainer.accelerator cpu --trainer.precision bf16-mixed --model.init_args.weight_dtype bfloat16
         --model.init_args.pretrained_model_name_or_path embedded:tiny-sd --data.init_args.resolution 32
         --trainer.max_steps "${TTC_STEPS:-12}")
else
    suffix=""
    common=(--device cuda --arch random:sd15 --resolution 512 --batch-size 2 --precision 16-mixed
            --weight-dtype float16 --steps 120 --warmup 20 --dvar-every 10)
    cli=(--trainer.accelerator cuda --model.init_args.pretrained_model_name_or_path random:sd15
         --trainer.max_steps "${TTC_STEPS:-400}")
fi
bench() {  # tag, then extra arguments
    local tag=$1; shift
    python benchmarks/throughput.py "${common[@]}" "$@" --tag "gpu15_${tag}${suffix}"
}
bench A_frozen_in_autocast --frozen-in-autocast
bench B_outside_autocast
bench C_channels_last --channels-last
bench D_regional_compile --compile regional

# Time to concept: Textual Inversion with DVAR (every 10 steps), from the command to learned_embeds.safetensors.
run_dir=$(mktemp -d)/ttc
start=$(date +%s.%N)
python -m lightning_custom fit --config configs/textual_inversion.yaml "${cli[@]}" \
    --data.init_args.instance_data_dir embedded --trainer.default_root_dir "$run_dir" \
    --trainer.enable_checkpointing false --sample.every_n_steps 0 --sample.at_stop false \
    --dvar.window 50 --dvar.threshold 0.15
end=$(date +%s.%N)
{
    echo "time to concept: $(python -c "print(round($end - $start, 2))") s wall, command to artifacts"
    echo "artifacts: $(ls "$run_dir" | tr '\n' ' ')"
    python - "$run_dir/summary.json" <<'EOF'
import json, sys
summary = json.load(open(sys.argv[1]))
print({k: summary.get(k) for k in ("stopped_by", "stop_step", "max_steps", "wall_seconds", "seconds_per_step")})
EOF
} | tee "$out/time_to_concept_gpu${suffix}.txt"
