#!/usr/bin/env bash
# One call, under 8 minutes on one H100: throughput of every method on the SD 1.5 architecture with random
# weights built in-process (no download), 512 px, batch 2, fp16, as in issue 6's reference table. Runs the
# paper's every-step DVAR without caches ("before") and the defaults ("after": caches, every 10 steps),
# plus regional compilation. Results: benchmarks/results/throughput_gpu_*.{json,md}.
#   bash benchmarks/gpu_throughput.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
common=(--device cuda --arch random:sd15 --resolution 512 --batch-size 2 --precision 16-mixed
        --weight-dtype float16 --steps 120 --warmup 20)
python benchmarks/throughput.py "${common[@]}" --no-cache --dvar-every 1 --tag gpu_before
python benchmarks/throughput.py "${common[@]}" --dvar-every 10 --channels-last --tag gpu_after
python benchmarks/throughput.py "${common[@]}" --dvar-every 10 --channels-last --compile regional \
    --methods textual_inversion --tag gpu_after_regional_compile
