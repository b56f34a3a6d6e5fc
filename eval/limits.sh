#!/usr/bin/env bash
# What limits tau on SmolLM2 (issue 4): equal-budget training ablations over N, r and data size, each measured by
# `flexdraft eval-tau` on 64 held-out ShareGPT prompts (greedy, 256 new tokens, all B-1 drafts verified).
# Results: OUT/<run>/ (training) and OUT/tau-<run>/tau.md (figures); see eval/results/limits-smollm2/README.md.
# Usage: eval/limits.sh DATA OUT   (DATA: a `flexdraft prepare-data` folder). Rerun to resume: finished runs are kept.
set -euo pipefail
data=${1:?data folder}; out=${2:?output folder}
flexdraft=${FLEXDRAFT:-flexdraft}
mkdir -p "$out"
run() {  # name, then the arguments that differ
  local name=$1; shift
  [ -f "$out/$name/train_summary.json" ] || "$flexdraft" train --data "$data" --out "$out/$name" --block-size 8 \
    --steps 400 --sequences-per-step 4 --anchors 32 --lr 1e-3 --warmup 50 --loss-decay 0.85 --checkpoint-every 100 \
    --seed 0 --compute-dtype bfloat16 --threads 1 "$@"
  mkdir -p "$out/tau-$name"  # the target's plain answers are the same for every run
  find "$out" -path "$out/tau-*/plain-sharegpt-256-64.json" -exec cp -n {} "$out/tau-$name/" \; -quit
  "$flexdraft" eval-tau --adapter "$out/$name/adapter" --out "$out/tau-$name" --datasets sharegpt --limit 64 \
    --verify full --check 0 --threads 1
}
run n4-r64-s512 --tuned-depth 4 --rank 64 --max-samples 512
run n8-r64-s512 --tuned-depth 8 --rank 64 --max-samples 512
run n2-r64-s512 --tuned-depth 2 --rank 64 --max-samples 512
run n4-r64-s128 --tuned-depth 4 --rank 64 --max-samples 128
run n4-r256-s512 --tuned-depth 4 --rank 256 --max-samples 512
