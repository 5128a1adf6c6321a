#!/usr/bin/env bash
# Proves that the CUDA sources compile on a machine without a GPU: builds resalign_fast._C, CUDA
# variant, against torch 2.14.1 (a CUDA 13.0 build, local wheel) with nvcc 13.0 for sm_90, then
# imports it. Calling a CUDA kernel needs a driver, so the script only shows that attempt fail.
#
#   .ci/build_cuda.sh            # venv in /tmp/venv-cuda (reused), build in a temporary folder
#
# Knobs: RESALIGN_CUDA_VENV, PYTHON (3.11: the local torch wheel is cp311), TORCH_CUDA_ARCH_LIST
# (9.0), CUDA_HOME (/usr/local/cuda: torch otherwise guesses /usr/local and cannot link -lcudart),
# MAX_JOBS (2). Measured on the 2-core CI machine: see the report printed at the end.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
venv=${RESALIGN_CUDA_VENV:-/tmp/venv-cuda}
python=${PYTHON:-python3.11}
t0=$(date +%s)

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
# torch first and pinned: the local 2.14.1 wheel is the CUDA 13.0 build matching nvcc 13.0.
"$venv/bin/python" -m pip install -q torch==2.14.1 ninja pybind11 numpy setuptools
t1=$(date +%s)

out=$(mktemp -d /tmp/resalign-cuda-build.XXXXXX)
export FORCE_CUDA=1 RESALIGN_FAST_REQUIRE_EXTENSIONS=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-2}
(cd "$root" && "$venv/bin/python" setup.py -q build_ext --build-lib "$out/lib" --build-temp "$out/temp")
t2=$(date +%s)

so=$(ls "$out"/lib/resalign_fast/_C*.so)
"$venv/bin/python" - "$so" <<'PY'
import importlib.util
import sys

import torch

spec = importlib.util.spec_from_file_location("resalign_fast._C", sys.argv[1])
ext = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ext)
info = ext.build_info()
print("build_info:", {k: info[k] for k in sorted(info)})
assert info["variant"] == "cuda" and info["cuda_ops"] == "yes", info
missing = [f"{op}_cuda" for op in ("richardson_step", "fd_perturb", "fd_combine", "sgd_step", "adam_step")
           if not hasattr(ext, f"{op}_cuda")]
assert not missing, f"missing CUDA ops: {missing}"
try:
    x = torch.ones(7, device="cuda")
    print("CUDA call:", ext.fd_combine_cuda(x, x, 0.5))
except (RuntimeError, AssertionError) as exc:  # expected on a machine without a driver
    print("CUDA call failed as expected without a GPU:", str(exc).splitlines()[0])
PY
echo "build_cuda: torch install $((t1 - t0)) s, CUDA extension compile $((t2 - t1)) s, total $(( $(date +%s) - t0 )) s"
rm -rf "$out"
