"""Implicit (Moreau-envelope) hypergradient.

theta*(theta) = argmin_phi ft_loss(phi) + ||phi - theta||^2 / (2 gamma) satisfies
grad ft_loss(theta*) + (theta* - theta) / gamma = 0, so by the implicit function theorem
d theta* / d theta = (I + gamma H)^-1 with H the Hessian of ft_loss at theta* (symmetric). For an
outer objective F(theta) = outer_loss(theta, theta*(theta)):

    dF/dtheta = d_1 outer + (I + gamma H)^-1 d_2 outer,

where d_1, d_2 are the partial gradients in the first and second argument. Only HVPs at theta* are
needed, never the fine-tuning trajectory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from resalign_fast.hypergrad.hvp import make_hvp
from resalign_fast.hypergrad.solvers import make_solver

__all__ = ["implicit_hypergrad", "partial_grads"]


def partial_grads(
    outer_loss: Callable[[list[Tensor], list[Tensor]], Tensor],
    theta: Sequence[Tensor],
    theta_star: Sequence[Tensor],
) -> tuple[list[Tensor], list[Tensor]]:
    """Partial gradients (d_1 outer, d_2 outer) of ``outer_loss(theta, theta_star)``.

    Args:
        outer_loss: ``outer_loss(theta, theta_star) -> Tensor`` (0-d), both lists of tensors.
        theta: list of tensors (not modified; detached leaf copies are differentiated).
        theta_star: list of tensors, same convention.

    Returns:
        (d1, d2), shaped like theta and theta_star; zeros where an argument is unused.
    """
    th = [t.detach().clone().requires_grad_(True) for t in theta]
    ts = [t.detach().clone().requires_grad_(True) for t in theta_star]
    with torch.enable_grad():
        out = outer_loss(th, ts)
        if out.dim() != 0:
            raise ValueError(f"outer_loss must return a 0-d tensor, got shape {tuple(out.shape)}")
        gs = torch.autograd.grad(out, th + ts, allow_unused=True)
    gs = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(th + ts, gs)]
    return gs[: len(th)], gs[len(th) :]


def implicit_hypergrad(
    theta: Sequence[Tensor],
    theta_star: Sequence[Tensor],
    outer_loss: Callable[[list[Tensor], list[Tensor]], Tensor],
    ft_loss: Callable[[list[Tensor]], Tensor],
    *,
    gamma: float = 1.0,
    iters: int = 5,
    alpha: float = 1.0,
    solver: str = "richardson",
    hvp: str = "exact",
) -> list[Tensor]:
    """Gradient in theta of ``outer_loss(theta, theta*(theta))`` at the given proximal point.

    Args:
        theta: the unlearning parameters, list of tensors (need not require grad).
        theta_star: the fine-tuned point, list of tensors shaped like theta (taken as the proximal
            point of ft_loss around theta; it is not recomputed).
        outer_loss: ``outer_loss(theta, theta_star) -> Tensor`` (0-d).
        ft_loss: ``ft_loss(phi: list[Tensor]) -> Tensor`` (0-d), the fine-tuning loss.
        gamma: proximal weight.
        iters: solver iterations (see ``solvers.py`` for the HVP count of each solver).
        alpha: step size of richardson / neumann (unused by cg).
        solver: "richardson", "cg" or "neumann".
        hvp: HVP backend, "exact", "jvp" or "fd".

    Returns:
        d_1 outer + (I + gamma H)^-1 d_2 outer, a list of detached tensors shaped like theta.

    Raises:
        ValueError: theta and theta_star differ in length or shapes, or a bad solver/backend name.
    """
    theta, theta_star = list(theta), list(theta_star)
    if len(theta) != len(theta_star) or any(a.shape != b.shape for a, b in zip(theta, theta_star)):
        raise ValueError("theta and theta_star must be lists of tensors with the same shapes")
    kw = {"gamma": gamma, "iters": iters}
    if solver != "cg":
        kw["alpha"] = alpha
    solve = make_solver(solver, **kw)
    d1, d2 = partial_grads(outer_loss, theta, theta_star)
    h = make_hvp(ft_loss, theta_star, backend=hvp)
    v = solve(h, d2)
    return [a + b for a, b in zip(d1, v)]
