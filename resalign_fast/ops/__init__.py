"""Fused ops, one file each: `<op>_ref` (plain differentiable torch, the specification) and a
dispatcher `<op>(..., backend="auto")` over the backends cuda -> triton -> cpp -> torch.

A backend is a kernel provider, nothing else. `registry` says which backend can run what and why
not, and dispatches (`python -m resalign_fast.info` prints the table); `backends` is what the
built-in ones need. The kernels are in resalign_fast._C (C++/CUDA, csrc/) and
resalign_fast.kernels (Triton, kernels/); `attention` has its own backends (triton, sdpa,
chunked, math).
"""

from resalign_fast.ops import registry
from resalign_fast.ops.fd_hvp import fd_combine, fd_combine_ref, fd_perturb, fd_perturb_ref
from resalign_fast.ops.optim_step import adam_step, adam_step_ref, sgd_step, sgd_step_ref
from resalign_fast.ops.registry import (
    UnsupportedBackendError,
    not_supported_reasons,
    select_backend,
)
from resalign_fast.ops.richardson_step import richardson_step, richardson_step_ref

__all__ = [
    "UnsupportedBackendError",
    "adam_step",
    "adam_step_ref",
    "fd_combine",
    "fd_combine_ref",
    "fd_perturb",
    "fd_perturb_ref",
    "not_supported_reasons",
    "registry",
    "richardson_step",
    "richardson_step_ref",
    "select_backend",
    "sgd_step",
    "sgd_step_ref",
]
