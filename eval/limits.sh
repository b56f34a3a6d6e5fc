#!/usr/bin/env bash
# The SmolLM2 training study (issue 12): equal-budget ablations of how mask rows start, how calibration reads its
# inputs and where its correction goes, joint vs second-stage calibration, tuned depth N, calibration rank and loss
# decay; each run measured by `flexdraft eval-tau` on 64 held-out ShareGPT prompts (greedy, 256 new tokens, all B-1
# drafts verified), never on MT-Bench or HumanEval. Results: OUT/<run>/ (training), OUT/tau-<run>/ (figures) and
# OUT/summary.md (python -m flexdraft_sgl.eval.limits); see eval/results/limits-smollm2/README.md.
# Usage: eval/limits.sh DATA OUT [RUN ...]   (DATA: a `flexdraft prepare-data` folder; RUN: names below, default
# all; two shells with disjoint RUN lists share the two cores). Rerun to resume: finished runs are kept.
set -euo pipefail
data=${1:?data folder}; out=${2:?output folder}; shift 2
flexdraft=${FLEXDRAFT:-flexdraft}
threads=${THREADS:-1}
mkdir -p "$out"

# Every run: B = 8, 150 steps x 4 sequences x 32 mask blocks on the first 720 samples, lr 1e-3, bf16, seed 0. The
# base run is today's design with the split fixed; every other run changes one thing from it.
declare -A runs=(
  [base]=""
  [token-scale]="--mask-init token-scale"
  [raw-input]="--calibration-input raw"
  [second-stage]="--steps 120 --calibration second-stage --calibration-steps 30"
  [n8]="--tuned-depth 8"
  [r256]="--rank 256"
  [hidden-r256]="--calibration-form hidden --rank 256"
  [decay-0.6]="--loss-decay 0.6"
)
order=(base token-scale raw-input second-stage n8 r256 hidden-r256 decay-0.6)

run() {  # name
  local name=$1
  [ -n "${runs[$name]+x}" ] || { echo "unknown run $name; choose from ${order[*]}" >&2; exit 2; }
  # The split-layer states are the same for every run of the same N: the trainer reuses base's if its key matches.
  mkdir -p "$out/$name"
  [ -f "$out/base/split_hidden.pt" ] && [ ! -e "$out/$name/split_hidden.pt" ] && \
    ln "$out/base/split_hidden.pt" "$out/$name/split_hidden.pt"
  # shellcheck disable=SC2086  # the run's arguments are words
  [ -f "$out/$name/train_summary.json" ] || "$flexdraft" train --data "$data" --out "$out/$name" --block-size 8 \
    --tuned-depth 4 --rank 64 --steps 150 --sequences-per-step 4 --anchors 32 --lr 1e-3 --warmup 15 \
    --loss-decay 0.85 --checkpoint-every 25 --seed 0 --compute-dtype bfloat16 --max-samples 720 \
    --threads "$threads" ${runs[$name]}
  evaluate "$out/$name/adapter" "$out/tau-$name"
}

evaluate() {  # adapter folder, tau folder
  mkdir -p "$2"  # the target's plain answers are the same for every run
  find "$out" -path "$out/tau-*/plain-sharegpt-256-64.json" -exec cp -n {} "$2/" \; -quit
  [ -f "$2/rows.jsonl" ] || "$flexdraft" eval-tau --adapter "$1" --out "$2" --datasets sharegpt --limit 64 \
    --block-sizes 8 --verify full --check 0 --threads "$threads" > /dev/null
}

names=("$@")
[ ${#names[@]} -gt 0 ] || names=("${order[@]}")
for name in "${names[@]}"; do
  run "$name"
done
