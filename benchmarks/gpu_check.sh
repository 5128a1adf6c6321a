#!/usr/bin/env bash
# The GPU checks, as one script (issues 4, 5 and 13): build the extension, run the op, attention and
# outer-step tables (the last with the memory planner's estimate of every measured step), and the
# planner's own table for the same model. Budget: under 8 minutes on an H200.
#   bash benchmarks/gpu_check.sh                    (from anywhere, on the GPU machine)
#   GPU_CHECK_CPU=1 bash benchmarks/gpu_check.sh    (the CPU rehearsal: every stage, tiny sizes, ~2 min)
# Needs torch with CUDA, diffusers, peft, transformers, triton (see README; diffusers can be carried
# as a wheel). Writes everything to stdout and, when $OUT is set, to $OUT/gpu_check.log. $PYTHON
# picks the interpreter (default python3).
#
# Stage time limits (s), GPU: build 150 + info 15 + ops 55 + attention 60 + outer step 150 +
# planner 40 = 470, under the 480 s budget. The planner is CPU work: it runs in the background
# beside the GPU-bound ops and attention stages (after the build, which rewrites the extension in
# place), so it adds no wall time unless those two end in under 40 s. A stage that fails prints
# "== <stage> FAILED (rc N)"; the remaining stages still run, and the script exits 1 at the end.
# The CPU rehearsal runs the same scripts with --device cpu: no build and no nvidia-smi, the ops and
# attention at tiny sizes with the Triton interpreter (TRITON_INTERPRET=1), the outer step on
# SD_SMALL_UNET at 8x8 latents, the planner on its tiny model; the planner runs in the background
# there too, but is waited for at once (one busy process at a time).
set -uo pipefail
cd "$(dirname "$0")/.."
cpu=${GPU_CHECK_CPU:-0}
py=${PYTHON:-python3}
log=${OUT:-/tmp}/gpu_check.log
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
plan_dir=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$plan_dir"' EXIT

failed=()
# stage NAME LIMIT CMD...: run CMD with a time limit, then say how it went.
stage() {
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  timeout "$limit" "$@"
  rc=$?
  finish "$name" "$rc" "$limit" $(( $(date +%s) - start ))
}
# finish NAME RC LIMIT SECONDS: the stage's closing line; a failure is remembered.
finish() {
  local name=$1 rc=$2 limit=$3 took=$4
  if [ "$rc" -eq 0 ]; then
    echo "== $name done in $took s"
  else
    echo "== $name FAILED (rc $rc$([ "$rc" -eq 124 ] && echo ": timed out after $limit s")) after $took s"
    failed+=("$name")
  fi
}

{
  t0=$(date +%s)
  if [ "$cpu" = 1 ]; then
    echo "== $(date -u +%FT%TZ) CPU rehearsal (GPU_CHECK_CPU=1): $(nproc) CPUs, $py"
    echo "== build: skipped (CPU rehearsal: the extension in place is used, CPU kernels only)"
    ops=(--device cpu --n 4097 --reps 3)
    attn=(--device cpu --batch 1 --heads 2 --tokens 64 --text 7 --head-dim 16 --chunk 32 --chunks 16 --reps 1)
    outer=(--device cpu --model small --resolution 8 --recipes reference lean-fd lean-fd-ckpt-full --plan-jobs 1 --plan-first)
    plan=(--model tiny --resolution 8 --target cpu --block 1)
    interp=1
  else
    echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
    echo "== build: resalign_fast._C with the CUDA kernels (sm_90), in place"
    MAX_JOBS=16 FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 stage build 150 "$py" setup.py -q build_ext --inplace
    [ ${#failed[@]} -eq 0 ] || echo "   (the CUDA ops fall back: their rows in the ops table say why)"
    ops=(--no-jit)
    attn=()
    outer=()
    plan=(--model sd-v1-4 --resolution 512)
    interp=0
  fi
  echo "== info: versions, extension, ops x backends"
  stage info 15 "$py" -m resalign_fast.info

  # The planner's table for the model of the outer step, full-parameter Adam configuration (its LoRA
  # column is in the outer-step table: the planner's estimate of each measured step).
  plan_start=$(date +%s)
  ( OMP_NUM_THREADS=1 timeout 40 "$py" -m resalign_fast.memory "${plan[@]}" --configs full-adam-standard \
      --hvp fd --attention fused --checkpointing on --no_reference >"$plan_dir/out" 2>&1
    echo $? >"$plan_dir/rc"
    date +%s >"$plan_dir/end" ) &
  plan_pid=$!
  if [ "$cpu" = 1 ]; then wait "$plan_pid"; fi

  echo "== ops: fused ops (richardson_step, fd_hvp, optim_step) per backend vs <op>_ref"
  TRITON_INTERPRET=$interp stage ops 55 "$py" benchmarks/gpu_ops.py "${ops[@]}"
  echo "== attention: math, chunked, sdpa, triton at SD shapes"
  TRITON_INTERPRET=$interp stage attention 60 "$py" benchmarks/gpu_attention.py "${attn[@]}"
  echo "== outer step: one ResAlign outer step per recipe, measured and estimated by the planner"
  stage "outer step" 150 "$py" benchmarks/gpu_outer_step.py "${outer[@]}"

  echo "== planner: python -m resalign_fast.memory ${plan[*]} --configs full-adam-standard --hvp fd" \
       "--attention fused --checkpointing on --no_reference (ran in the background from $(( plan_start - t0 )) s)"
  if [ "$cpu" != 1 ]; then wait "$plan_pid"; fi
  cat "$plan_dir/out"
  finish planner "$(cat "$plan_dir/rc" 2>/dev/null || echo 1)" 40 $(( $(cat "$plan_dir/end" 2>/dev/null || date +%s) - plan_start ))

  echo "== total $(( $(date +%s) - t0 )) s"
  if [ ${#failed[@]} -gt 0 ]; then
    echo "== FAILED stages: ${failed[*]}"
    exit 1
  fi
  echo "== all stages passed"
} 2>&1 | tee "$log"
