"""Arithmetic of the central finite-difference Hessian-vector product, fused.

    H v ~ (g(x + eps v) - g(x - eps v)) / (2 eps)

`fd_perturb` makes both evaluation points in one pass over x and v; `fd_combine` turns the two
gradients into H v in one pass. The gradients themselves come from ordinary first-order autograd.
"""

from __future__ import annotations

from torch import Tensor

from resalign_fast.ops import registry


def fd_perturb_ref(x: Tensor, v: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Plain-torch reference: (x + eps v, x - eps v), with eps * v rounded once and shared.

    Args:
        x: (N,) point.
        v: (N,) direction.
        eps: step.

    Returns:
        x_plus (N,), x_minus (N,).
    """
    t = eps * v
    return x + t, x - t


def fd_combine_ref(g_plus: Tensor, g_minus: Tensor, eps: float) -> Tensor:
    """Plain-torch reference: (g_plus - g_minus) / (2 eps).

    Args:
        g_plus: (N,) gradient at x + eps v.
        g_minus: (N,) gradient at x - eps v.
        eps: the step used by fd_perturb.

    Returns:
        hv (N,).
    """
    return (g_plus - g_minus) / (2.0 * eps)


def _ext():
    return registry.extension()[0]


def _kernels():
    return registry.import_kernels("fd_hvp")


PERTURB = {
    "cuda": lambda x, v, eps: _ext().fd_perturb_cuda(x, v, float(eps)),
    "triton": lambda x, v, eps: _kernels().fd_perturb_triton(x, v, float(eps)),
    "cpp": lambda x, v, eps: _ext().fd_perturb_cpu(x, v, float(eps)),
    "torch": fd_perturb_ref,
}
COMBINE = {
    "cuda": lambda gp, gm, eps: _ext().fd_combine_cuda(gp, gm, float(eps)),
    "triton": lambda gp, gm, eps: _kernels().fd_combine_triton(gp, gm, float(eps)),
    "cpp": lambda gp, gm, eps: _ext().fd_combine_cpu(gp, gm, float(eps)),
    "torch": fd_combine_ref,
}


def fd_perturb_not_supported_reasons(backend: str, *tensors: Tensor) -> list[str]:
    """Why `backend` cannot run fd_perturb on (x, v) (empty: it can)."""
    return registry.standard_reasons("fd_perturb", backend, tensors)


def fd_combine_not_supported_reasons(backend: str, *tensors: Tensor) -> list[str]:
    """Why `backend` cannot run fd_combine on (g_plus, g_minus) (empty: it can)."""
    return registry.standard_reasons("fd_combine", backend, tensors)


registry.register_op("fd_perturb", registry.STANDARD_BACKENDS, fd_perturb_not_supported_reasons)
registry.register_op("fd_combine", registry.STANDARD_BACKENDS, fd_combine_not_supported_reasons)


def _check_eps(op: str, eps: float) -> None:
    if not eps > 0.0:
        raise ValueError(f"{op}: eps must be > 0, got {eps}")


def fd_perturb(x: Tensor, v: Tensor, eps: float, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """(x + eps v, x - eps v) in one pass.

    Args:
        x: (N,) point; v the same shape, dtype and device.
        v: (N,) direction.
        eps: step, > 0.
        backend: "auto" (cuda -> triton -> cpp -> torch) or one of those names.

    Returns:
        x_plus (N,), x_minus (N,).

    Raises:
        ValueError: mismatched buffers, eps <= 0, or a named backend that cannot run.
    """
    registry.check_buffers("fd_perturb", x=x, v=v)
    _check_eps("fd_perturb", eps)
    return PERTURB[registry.select_backend("fd_perturb", backend, x, v)](x, v, eps)


def fd_combine(g_plus: Tensor, g_minus: Tensor, eps: float, backend: str = "auto") -> Tensor:
    """hv = (g_plus - g_minus) / (2 eps) in one pass.

    Args:
        g_plus: (N,) gradient at x + eps v; g_minus the same shape, dtype and device.
        g_minus: (N,) gradient at x - eps v.
        eps: the step used by fd_perturb, > 0.
        backend: "auto" (cuda -> triton -> cpp -> torch) or one of those names.

    Returns:
        hv (N,).

    Raises:
        ValueError: mismatched buffers, eps <= 0, or a named backend that cannot run.
    """
    registry.check_buffers("fd_combine", g_plus=g_plus, g_minus=g_minus)
    _check_eps("fd_combine", eps)
    return COMBINE[registry.select_backend("fd_combine", backend, g_plus, g_minus)](g_plus, g_minus, eps)
