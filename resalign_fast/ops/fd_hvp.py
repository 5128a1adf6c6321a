"""Arithmetic of the central finite-difference Hessian-vector product, fused.

    H v ~ (g(x + eps v) - g(x - eps v)) / (2 eps)

`fd_perturb` makes both evaluation points in one pass over x and v; `fd_combine` turns the two
gradients into H v in one pass. The gradients themselves come from ordinary first-order autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from resalign_fast.ops import backends, registry


def fd_perturb_ref(
    x: Tensor, v: Tensor, eps: float, *, out: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """Plain-torch reference: (x + eps v, x - eps v), with eps * v rounded once and shared.

    Args:
        x: (N,) point.
        v: (N,) direction.
        eps: step.
        out: optional (x_plus, x_minus) buffers.

    Returns:
        x_plus (N,), x_minus (N,).
    """
    plus, minus = out if out is not None else (None, None)
    t = eps * v
    return torch.add(x, t, out=plus), torch.sub(x, t, out=minus)


def fd_combine_ref(
    g_plus: Tensor, g_minus: Tensor, eps: float, *, out: Tensor | None = None
) -> Tensor:
    """Plain-torch reference: (g_plus - g_minus) / (2 eps).

    Args:
        g_plus: (N,) gradient at x + eps v.
        g_minus: (N,) gradient at x - eps v.
        eps: the step used by fd_perturb.
        out: optional (N,) buffer for hv.

    Returns:
        hv (N,).
    """
    return torch.div(g_plus - g_minus, 2.0 * eps, out=out)


def _ext():
    return backends.extension()[0]


def _kernels():
    return backends.import_kernels("fd_hvp")


# backend -> fn(x, v, eps, out_plus, out_minus), in auto order (backends.STANDARD_BACKENDS)
PERTURB_IMPLEMENTATIONS = {
    "cuda": lambda x, v, eps, op, om: _ext().fd_perturb_cuda(x, v, eps, op, om),
    "triton": lambda x, v, eps, op, om: _kernels().fd_perturb_triton(x, v, eps, op, om),
    "cpp": lambda x, v, eps, op, om: _ext().fd_perturb_cpu(x, v, eps, op, om),
    "torch": lambda x, v, eps, op, om: fd_perturb_ref(
        x, v, eps, out=None if op is None else (op, om)
    ),
}
# backend -> fn(g_plus, g_minus, eps, out), in auto order
COMBINE_IMPLEMENTATIONS = {
    "cuda": lambda gp, gm, eps, out: _ext().fd_combine_cuda(gp, gm, eps, out),
    "triton": lambda gp, gm, eps, out: _kernels().fd_combine_triton(gp, gm, eps, out),
    "cpp": lambda gp, gm, eps, out: _ext().fd_combine_cpu(gp, gm, eps, out),
    "torch": lambda gp, gm, eps, out: fd_combine_ref(gp, gm, eps, out=out),
}


def fd_perturb_not_supported_reasons(backend: str, *tensors: Tensor | None) -> list[str]:
    """Why `backend` cannot run fd_perturb on (x, v, out_plus, out_minus) (empty: it can)."""
    return backends.standard_reasons("fd_perturb", backend, tensors)


def fd_combine_not_supported_reasons(backend: str, *tensors: Tensor | None) -> list[str]:
    """Why `backend` cannot run fd_combine on (g_plus, g_minus, out) (empty: it can)."""
    return backends.standard_reasons("fd_combine", backend, tensors)


registry.register_op(
    "fd_perturb",
    PERTURB_IMPLEMENTATIONS,
    fd_perturb_not_supported_reasons,
    backends.skip_interpreter,
)
registry.register_op(
    "fd_combine",
    COMBINE_IMPLEMENTATIONS,
    fd_combine_not_supported_reasons,
    backends.skip_interpreter,
)


def _check_eps(op: str, eps: float) -> None:
    if not eps > 0.0:
        raise ValueError(f"{op}: eps must be > 0, got {eps}")


def fd_perturb(
    x: Tensor,
    v: Tensor,
    eps: float,
    backend: str = "auto",
    *,
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """(x + eps v, x - eps v) in one pass.

    Args:
        x: (N,) point; v the same shape, dtype and device.
        v: (N,) direction.
        eps: step, > 0.
        backend: "auto" (cuda -> triton -> cpp -> torch) or one of those names.
        out: optional (x_plus, x_minus) buffers, overlapping no input (reused buffers save the
            allocation, which on CPU costs more than the arithmetic).

    Returns:
        x_plus (N,), x_minus (N,).

    Raises:
        ValueError: mismatched buffers, eps <= 0, or a named backend that cannot run.
    """
    registry.check_buffers("fd_perturb", x=x, v=v)
    _check_eps("fd_perturb", eps)
    out_plus, out_minus = out if out is not None else (None, None)
    registry.check_outputs("fd_perturb", x, (x, v), x_plus=out_plus, x_minus=out_minus)
    run = registry.dispatch("fd_perturb", backend, x, v, out_plus, out_minus)
    return run(x, v, float(eps), out_plus, out_minus)


def fd_combine(
    g_plus: Tensor, g_minus: Tensor, eps: float, backend: str = "auto", *, out: Tensor | None = None
) -> Tensor:
    """hv = (g_plus - g_minus) / (2 eps) in one pass.

    Args:
        g_plus: (N,) gradient at x + eps v; g_minus the same shape, dtype and device.
        g_minus: (N,) gradient at x - eps v.
        eps: the step used by fd_perturb, > 0.
        backend: "auto" (cuda -> triton -> cpp -> torch) or one of those names.
        out: optional (N,) buffer for hv, overlapping no input.

    Returns:
        hv (N,).

    Raises:
        ValueError: mismatched buffers, eps <= 0, or a named backend that cannot run.
    """
    registry.check_buffers("fd_combine", g_plus=g_plus, g_minus=g_minus)
    _check_eps("fd_combine", eps)
    registry.check_outputs("fd_combine", g_plus, (g_plus, g_minus), out=out)
    run = registry.dispatch("fd_combine", backend, g_plus, g_minus, out)
    return run(g_plus, g_minus, float(eps), out)
