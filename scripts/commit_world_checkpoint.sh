#!/usr/bin/env bash
# Commit the small world-sd training checkpoint (and the staged VAE/tokenizer) every INTERVAL seconds, touching
# only those paths, so a later session resumes the background training instead of restarting it.
#   setsid nohup scripts/commit_world_checkpoint.sh 1800 > runs/world-sd/commit.log 2>&1 &
set -u
cd "$(dirname "$0")/.."
interval=${1:-1800}
while true; do
  sleep "$interval"
  paths=()
  for p in checkpoints/world-sd lightning_custom/assets/world-sd; do [ -e "$p" ] && paths+=("$p"); done
  [ ${#paths[@]} -gt 0 ] || continue
  [ -n "$(git status --porcelain -- "${paths[@]}")" ] || continue
  step=$(python3 -c "import json;print(json.load(open('checkpoints/world-sd/state.json'))['step'])" 2>/dev/null || echo 0)
  for attempt in 1 2 3 4 5; do
    if git add -- "${paths[@]}" && git commit -q -m "world-sd training checkpoint at step $step (background run of scripts/train_world_sd.py; resume by rerunning it)" -- "${paths[@]}"; then
      echo "$(date -u +%H:%M:%S) committed step $step"; break
    fi
    sleep 20
  done
done
