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
# Then the flow models (issue 13, item 8): DreamBooth-LoRA and Textual Inversion on the FLUX.1-dev and SD3.5 Medium
# architectures with random weights built on the GPU (no download), 1024 px, batch 1, bf16 weights under bf16-mixed,
# gradient checkpointing, DVAR every 5 steps on a fixed batch of 2: ms per step, DVAR share, peak memory. Compare the
# peaks with the estimates in benchmarks/results/flow_memory.md (benchmarks/flow_memory.py).
# Then the fleets (issue 24, item 8): 1 and 16 Textual Inversion (then DreamBooth-LoRA) concepts on the SD 1.5
# architecture at 512 px, as
# separate CLI runs and as one fleet, 100 steps each (random weights learn nothing: no DVAR stop), start-up included:
# concepts per GPU-process CPU-hour and wall time (benchmarks/fleet.py throughput).
# Results: benchmarks/results/throughput_gpu15_*.{json,md}, time_to_concept_gpu.txt, throughput_flow_*.{json,md} and
# fleet_gpu/fleet.md (dry run: *_dryrun*).
#   bash benchmarks/gpu_throughput.sh
#   GPU_THROUGHPUT_ONLY=flow bash benchmarks/gpu_throughput.sh     # one part: sd, ttc, flow or fleet
# Dry run on a CPU with the tiny models, a few steps (checks every command; its numbers mean nothing; the flow rows
# run on embedded:tiny-flux / embedded:tiny-sd3, and are skipped with a note where this checkout has no such model):
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
    flow=(--device cpu --resolution 32 --batch-size 1 --precision bf16-mixed --weight-dtype bfloat16 --steps 5
          --warmup 2 --dvar-every 2 --eval-batch-size 2 --gradient-checkpointing)
    flux_arch=embedded:tiny-flux sd3_arch=embedded:tiny-sd3
    archs_2026=(z_image=embedded:tiny-z-image flux2=embedded:tiny-flux2 qwen_image=embedded:tiny-qwen-image)
else
    suffix=""
    common=(--device cuda --arch random:sd15 --resolution 512 --batch-size 2 --precision 16-mixed
            --weight-dtype float16 --steps 120 --warmup 20 --dvar-every 10)
    cli=(--trainer.accelerator cuda --model.init_args.pretrained_model_name_or_path random:sd15
         --trainer.max_steps "${TTC_STEPS:-400}")
    flow=(--device cuda --resolution 1024 --batch-size 1 --precision bf16-mixed --weight-dtype bfloat16 --steps 25
          --warmup 5 --dvar-every 5 --eval-batch-size 2 --gradient-checkpointing)
    flux_arch=random:flux sd3_arch=random:sd3
    # issue 28: the published architectures (lightning_custom/synthetic/architectures_2026.py); klein 9B and Qwen-Image
    # need the 8-bit base on an 80 GiB card only without gradient checkpointing (benchmarks/results/flow_memory_2026.md)
    archs_2026=(z_image=random:z-image flux2=random:flux2-klein-4b flux2_9b=random:flux2-klein-9b
                qwen_image=random:qwen-image)
fi
only=${GPU_THROUGHPUT_ONLY:-sd,ttc,flow,flow2026,fleet}
part() { [[ ",$only," == *",$1,"* ]]; }
bench() {  # tag, then extra arguments
    local tag=$1; shift
    python benchmarks/throughput.py "${common[@]}" "$@" --tag "gpu15_${tag}${suffix}"
}
if part sd; then
    bench A_frozen_in_autocast --frozen-in-autocast
    bench B_outside_autocast
    bench C_channels_last --channels-last
    bench D_regional_compile --compile regional
fi

# Flow models: the architectures are built on the GPU inside each method's setup (setup_seconds in the rows).
flow_bench() {  # tag, arch
    if ! python -c "import sys; from lightning_custom.families import load_model" 2>/dev/null; then
        echo "flow rows skipped: this checkout has no lightning_custom.families.load_model" >&2; return 0
    fi
    if [[ $2 == embedded:* ]] && ! python -c "import sys; from lightning_custom.families.components import resolve_model_path as r; r(sys.argv[1])" "$2" 2>/dev/null; then
        echo "flow row $1 skipped: $2 is not an embedded model in this checkout" >&2; return 0
    fi
    python benchmarks/throughput.py "${flow[@]}" --arch "$2" --methods dreambooth_lora,textual_inversion \
        --tag "flow_${1}${suffix}"
}
if part flow; then
    flow_bench flux "$flux_arch"
    flow_bench sd3 "$sd3_arch"
fi
# Z-Image, FLUX.2 [klein], Qwen-Image (issue 28): DreamBooth-LoRA with "sks" (they refuse new tokens) and full
# DreamBooth; a checkout without these families skips the rows.
if part flow2026; then
    for entry in "${archs_2026[@]}"; do
        tag=${entry%%=*} arch=${entry#*=}
        if ! python -c "import sys; from lightning_custom.synthetic.architectures import architecture_names as a; from lightning_custom.families.components import resolve_model_path as r; n = sys.argv[1]; sys.exit(0 if n in a() or not n.startswith('random:') and r(n) else 1)" "$arch" 2>/dev/null; then
            echo "flow row $tag skipped: $arch is not known to this checkout" >&2; continue
        fi
        python benchmarks/throughput.py "${flow[@]}" --arch "$arch" --methods dreambooth_lora_sks,dreambooth \
            --tag "flow2026_${tag}${suffix}"
    done
fi
if part fleet; then
    fleet_initializer=()
    if [[ "$suffix" == "_dryrun" ]]; then
        fleet_args="--model.init_args.pretrained_model_name_or_path embedded:tiny-sd --data.init_args.resolution 32"
        fleet_args+=" --dvar.stop false --trainer.max_steps 10"
        fleet_initializer=(--initializer toy)  # the tiny model's vocabulary lacks the world's shape names
    else
        fleet_args="--trainer.accelerator cuda --trainer.precision 16-mixed --model.init_args.weight_dtype float16"
        fleet_args+=" --model.init_args.pretrained_model_name_or_path random:sd15 --data.init_args.resolution 512"
        fleet_args+=" --dvar.stop false --trainer.max_steps 100"
    fi
    python benchmarks/fleet.py throughput --sizes 1 16 --out "$out/fleet_gpu$suffix" --work /tmp/fleet_gpu$suffix \
        --cli-args "$fleet_args" "${fleet_initializer[@]}" --forward batched
    python benchmarks/fleet.py throughput --method dreambooth_lora --sizes 1 16 --forward batched \
        --out "$out/fleet_lora_gpu$suffix" --work /tmp/fleet_gpu$suffix --cli-args "$fleet_args" "${fleet_initializer[@]}"
fi
part ttc || exit 0

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
