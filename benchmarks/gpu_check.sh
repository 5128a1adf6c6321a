#!/usr/bin/env bash
# The GPU checks, as one script (issue 4 and 5): build the extension, run the op, attention and
# outer-step tables, and the memory planner next to them. Budget: under 8 minutes on an H200.
#   bash benchmarks/gpu_check.sh            (from the repository root, on the GPU machine)
# Needs torch with CUDA, diffusers, peft, transformers, triton (see README; diffusers can be carried
# as a wheel). Writes everything to stdout and, when $OUT is set, to $OUT/gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
log=${OUT:-/tmp}/gpu_check.log
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
{
  echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
  t0=$(date +%s)
  MAX_JOBS=16 FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 timeout 240 python3 setup.py -q build_ext --inplace \
    && echo "== extension built in $(( $(date +%s) - t0 )) s" || echo "== extension build FAILED (ops fall back)"
  python3 -m resalign_fast.info
  echo "== fused ops (richardson_step, fd_hvp, optim_step) per backend vs <op>_ref"
  timeout 120 python3 benchmarks/gpu_ops.py --no-jit
  echo "== attention (math, chunked, triton, sdpa) at SD shapes"
  timeout 120 python3 benchmarks/gpu_attention.py
  echo "== one ResAlign outer step per recipe, SD v1.4-shaped UNet, 512 px"
  timeout 240 python3 benchmarks/gpu_outer_step.py --resolution 64
  echo "== memory planner estimates for the same model"
  timeout 60 python3 -m resalign_fast.memory --model sd-v1-4 --resolution 512
  echo "== total $(( $(date +%s) - t0 )) s"
} 2>&1 | tee "$log"
