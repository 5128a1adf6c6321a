"""One fused Richardson iteration for (I + gamma H) v = b, with the norms the guard needs.

    v_new   = v + alpha * (b - v - gamma * hv)        (hv = H v)
    upd_sq  = ||v_new - v||^2
    vnew_sq = ||v_new||^2

The reference reads and writes the buffers about ten times; the fused kernels read v, b, hv once
and write v_new once, accumulating both norms in fp64 on the way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from resalign_fast.ops import backends, registry

OP = "richardson_step"


def richardson_step_ref(
    v: Tensor, b: Tensor, hv: Tensor, alpha: float, gamma: float, *, out: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Plain-torch reference (the specification; differentiable when out is None).

    Args:
        v: (N,) current iterate.
        b: (N,) right-hand side.
        hv: (N,) H v.
        alpha: step size.
        gamma: proximal weight.
        out: optional (N,) buffer for v_new.

    Returns:
        v_new (N,), upd_sq (), vnew_sq (): the squared norms in v's dtype (fp32 for fp16/bf16).
    """
    v_new = torch.add(v, alpha * (b - v - gamma * hv), out=out)
    d = v_new - v
    acc = registry.accumulation_dtype(v.dtype)
    return v_new, d.square().sum(dtype=acc), v_new.square().sum(dtype=acc)


def _ext():
    return backends.extension()[0]


# backend -> fn(v, b, hv, alpha, gamma, out), in auto order (backends.STANDARD_BACKENDS)
IMPLEMENTATIONS = {
    "cuda": lambda *args: _ext().richardson_step_cuda(*args),
    "triton": lambda *args: backends.import_kernels(OP).richardson_step_triton(*args),
    "cpp": lambda *args: _ext().richardson_step_cpu(*args),
    "torch": lambda v, b, hv, alpha, gamma, out: richardson_step_ref(
        v, b, hv, alpha, gamma, out=out
    ),
}


def not_supported_reasons(backend: str, *tensors: Tensor | None) -> list[str]:
    """Why `backend` cannot run richardson_step on (v, b, hv, out) (empty: it can)."""
    return backends.standard_reasons(OP, backend, tensors)


registry.register_op(OP, IMPLEMENTATIONS, not_supported_reasons, backends.skip_interpreter)


def richardson_step(
    v: Tensor,
    b: Tensor,
    hv: Tensor,
    alpha: float,
    gamma: float,
    backend: str = "auto",
    *,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """v_new = v + alpha (b - v - gamma hv) with ||v_new - v||^2 and ||v_new||^2, in one pass.

    Args:
        v: (N,) current iterate; b and hv the same shape, dtype and device.
        b: (N,) right-hand side.
        hv: (N,) Hessian-vector product H v.
        alpha: step size.
        gamma: proximal weight.
        backend: "auto" (cuda -> triton -> cpp -> torch) or one of those names.
        out: optional (N,) buffer for v_new, overlapping no input (reusing one saves the
            allocation, which on CPU costs more than the arithmetic).

    Returns:
        v_new (N,), upd_sq (), vnew_sq (): 0-d tensors of squared norms, in v's dtype (fp32 for
        fp16/bf16); the fused backends accumulate them in fp64.

    Raises:
        ValueError: mismatched buffers, or a named backend that cannot run (every reason listed).
    """
    registry.check_buffers(OP, v=v, b=b, hv=hv)
    registry.check_outputs(OP, v, (v, b, hv), out=out)
    run = registry.dispatch(OP, backend, v, b, hv, out)
    return run(v, b, hv, float(alpha), float(gamma), out)
