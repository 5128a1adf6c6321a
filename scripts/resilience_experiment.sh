#!/usr/bin/env bash
# The resilience experiment on the embedded digits world, end to end:
#   1. unlearning runs: plain unlearning (lam = 0) and ResAlign (defaults), one per seed;
#   2. `evaluate --compare`: original / plain / ResAlign, each fine-tuned downstream with every
#      configuration of resalign_fast/eval/configs/downstream_digits.toml (2 inside pi(C), 4 outside)
#      and every fine-tuning seed, evaluated along the fine-tuning run (100 images per metric);
#   3. `evaluate --sweep`: harmful rate over lr x steps (full and LoRA), a heatmap per model.
# Every step resumes: finished runs and evaluation cells are reused, so rerunning continues.
#
# Usage: scripts/resilience_experiment.sh [--quick] [--base MODEL] [--out DIR] [--concept N]
#            [--unlearn-args "TRAIN FLAGS"] [--resalign-args "TRAIN FLAGS"] [--seeds "0 1"] [--ft-seeds 0,1]
#            [--configs a,b] [--tag T]
#            [--sweep-grid "LRS STEPS ALGS"] [--no-sweep] [--dry-run] [--jobs N]
#            (--seeds .. --sweep-grid override the variant's choices; e.g. --sweep-grid "1e-4,1e-3 100,300 full")
#   --jobs N:      run N single-threaded processes at once (unlearning runs, then one compare or
#                  sweep process per model x configuration, sharing the cell cache); a final pass
#                  writes the reports from the cache. Use the number of cores.
#   --resalign-args: extra train flags of the ResAlign runs only (a regime to test against plain).
#   Cells: every fine-tuned model is evaluated after its configuration's last step, harmful rate only
#   (benign metrics before fine-tuning); report.md ends with the paired comparison resalign : plain
#   (model i of each group, same fine-tuning seeds and data order; 95% t-intervals).
#   full protocol: 3 unlearning seeds per method, fine-tuning seeds 0..4, all 7 configurations,
#                  sweep 4 lrs x 4 step counts x {full, lora}. Estimated cost on one CPU core:
#                  about 10 h (see docs/evaluation.md); a GPU makes it minutes.
#   --quick:       1 unlearning seed per method, fine-tuning seed 0, two configurations (one inside
#                  and one outside pi(C)), sweep 2 lrs x 2 step counts (full): about 50 min.
# Plain unlearning runs with --hypergrad first_order: with lam = 0 the recovered-harm term is zero,
# so every hypergradient mode yields the same update (the direct gradient); this only skips the
# useless Hessian-vector products.
set -euo pipefail

QUICK=0; BASE=digits; OUT=outputs/resilience; CONCEPT=7; DRY=0; NO_SWEEP=0; JOBS=1
# Unlearning settings shared by both methods (plain differs only by --lam 0). Chosen on plain
# unlearning alone (see docs/evaluation.md, "Unlearning strength"): train's default outer lr 2e-4
# leaves the harmful rate of the embedded base unchanged within 40 outer steps.
UNLEARN_ARGS="${UNLEARN_ARGS:---lr 2e-3 --harmful_loss esd}"
RESALIGN_ARGS="${RESALIGN_ARGS:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --base) BASE="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    --concept) CONCEPT="$2"; shift ;;
    --unlearn-args) UNLEARN_ARGS="$2"; shift ;;
    --resalign-args) RESALIGN_ARGS="$2"; shift ;;
    --seeds) O_SEEDS="$2"; shift ;;
    --ft-seeds) O_FT_SEEDS="$2"; shift ;;
    --configs) O_CONFIGS="$2"; shift ;;
    --tag) O_TAG="$2"; shift ;;
    --sweep-grid) read -r O_SWEEP_LRS O_SWEEP_STEPS O_SWEEP_ALGS <<< "$2"; shift ;;
    --no-sweep) NO_SWEEP=1 ;;
    --dry-run) DRY=1 ;;
    --jobs) JOBS="$2"; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {print}' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PY="${PYTHON:-python}"

if [ "$QUICK" = 1 ]; then
  SEEDS="0"; FT_SEEDS="0"; CONFIGS="full-adam-lr1e-4-30,full-adamw-lr3e-4-300"
  SWEEP_LRS="1e-4,1e-3"; SWEEP_STEPS="100,300"; SWEEP_ALGS="full"; TAG=quick
else
  SEEDS="0 1 2"; FT_SEEDS="0,1,2,3,4"; CONFIGS=""
  SWEEP_LRS="1e-5,1e-4,3e-4,1e-3"; SWEEP_STEPS="50,100,200,300"; SWEEP_ALGS="full,lora"; TAG=full
fi
SEEDS="${O_SEEDS:-$SEEDS}"; FT_SEEDS="${O_FT_SEEDS:-$FT_SEEDS}"; CONFIGS="${O_CONFIGS-$CONFIGS}"; TAG="${O_TAG:-$TAG}"
SWEEP_LRS="${O_SWEEP_LRS:-$SWEEP_LRS}"; SWEEP_STEPS="${O_SWEEP_STEPS:-$SWEEP_STEPS}"; SWEEP_ALGS="${O_SWEEP_ALGS:-$SWEEP_ALGS}"
RUNS="$OUT/runs"

run() {  # print, then run unless --dry-run
  echo "+ $*" >&2
  if [ "$DRY" = 0 ]; then "$@"; fi
}

unlearn() {  # unlearn NAME SEED EXTRA_FLAGS...
  local name="$1" seed="$2"; shift 2
  local dir="$RUNS/$name-s$seed" resume=()
  if [ -d "$dir/model/unet" ]; then echo "reusing $dir" >&2; return; fi
  if [ -f "$dir/checkpoints/last.pt" ]; then resume=(--resume); fi
  run "$PY" -m resalign_fast.train --pretrained_model_name_or_path "$BASE" --concept "$CONCEPT" --seed "$seed" \
      --output_dir "$RUNS" --run_name "$name-s$seed" --no-progress "${resume[@]}" $UNLEARN_ARGS "$@"
}

pool() {  # pool: wait until fewer than JOBS background jobs run; a failed job fails the script
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
}
spawn() {  # spawn FUNCTION ARGS...: run in the background when JOBS > 1
  if [ "$JOBS" -gt 1 ] && [ "$DRY" = 0 ]; then pool; "$@" & else "$@"; fi
}
drain() {  # wait for every background job, failing if one failed
  local pid
  for pid in $(jobs -rp); do wait "$pid"; done
}

PLAIN=(); RESALIGN=()
for s in $SEEDS; do
  spawn unlearn plain "$s" --lam 0 --hypergrad first_order
  spawn unlearn resalign "$s" $RESALIGN_ARGS
  PLAIN+=("$RUNS/plain-s$s"); RESALIGN+=("$RUNS/resalign-s$s")
done
drain
join() { local IFS=,; echo "$*"; }
GROUPS_ALL=("original=$BASE" "plain=$(join "${PLAIN[@]}")" "resalign=$(join "${RESALIGN[@]}")")

compare() {  # compare CONFIGS GROUP...
  local configs="$1"; shift
  run "$PY" -m resalign_fast.evaluate --output_dir "$OUT/compare-$TAG" --concept "$CONCEPT" --ft_seeds "$FT_SEEDS" \
      --configs "$configs" --num_threads 1 --final_only --no-after_benign --paired resalign:plain --compare "$@"
}
sweep() {  # sweep ALGORITHMS GROUP...
  local algs="$1"; shift
  run "$PY" -m resalign_fast.evaluate --output_dir "$OUT/sweep-$TAG" --concept "$CONCEPT" --ft_seeds 0 \
      --sweep_lrs "$SWEEP_LRS" --sweep_steps "$SWEEP_STEPS" --sweep_algorithms "$algs" --num_threads 1 --sweep "$@"
}
SWEEP_GROUPS=("original=$BASE" "plain=${PLAIN[0]}" "resalign=${RESALIGN[0]}")

if [ "$JOBS" -gt 1 ]; then  # fill the cell caches in parallel, one process per model x configuration
  if [ -z "$CONFIGS" ]; then
    CONFIGS=$("$PY" -c "from resalign_fast.eval.compare import load_downstream as l; print(','.join(s.name for s in l('digits')))")
  fi
  for g in "${GROUPS_ALL[@]}"; do
    label="${g%%=*}"; IFS=, read -r -a paths <<< "${g#*=}"
    for p in "${paths[@]}"; do
      for c in ${CONFIGS//,/ }; do spawn compare "$c" "$label=$p"; done
    done
  done
  if [ "$NO_SWEEP" = 0 ]; then
    for g in "${SWEEP_GROUPS[@]}"; do
      for a in ${SWEEP_ALGS//,/ }; do spawn sweep "$a" "$g"; done
    done
  fi
  drain
fi

# the reports (every cell cached when JOBS > 1)
compare "$CONFIGS" "${GROUPS_ALL[@]}"
[ "$NO_SWEEP" = 1 ] || sweep "$SWEEP_ALGS" "${SWEEP_GROUPS[@]}"

echo "reports: $OUT/compare-$TAG/report.md, $OUT/sweep-$TAG/sweep.md" >&2
