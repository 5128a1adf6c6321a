"""Unrolled hypergradient: backpropagation through the simulated fine-tuning trajectory.

The alternative to the implicit (Moreau-envelope) hypergradient: instead of assuming that
fine-tuning reaches a proximal point, differentiate the optimizer trajectory itself,

    phi_0 = theta,  s_0 = fresh state
    phi_{t+1}, s_{t+1} = step(spec, phi_t, grad ft_loss(phi_t, t), s_t)      t = 0 .. T-1
    result = d/dtheta outer_loss(theta, phi_T)

(total derivative: the direct dependence of ``outer_loss`` on theta plus the path through phi_T).

Two modes give the same numbers:

- ``checkpoint=False``, the reference: one autograd graph over all T steps (gradients taken with
  ``create_graph=True``) and one backward. Activation memory grows linearly with T.
- ``checkpoint=True``: a forward sweep without any graph stores only parameter and optimizer-state
  snapshots; the reverse sweep then, for t = T-1 .. 0, recomputes step t from its snapshot (the
  fine-tuning gradient with ``create_graph=True``, then the optimizer update) and pulls the adjoint
  (a_phi, a_s) back through it with one vector-Jacobian product. Only one step's graph is alive at a
  time, so activation memory does not depend on T; the snapshots cost (T' + 1) copies of the
  parameters and optimizer state (T' = number of differentiated steps).

``ft_loss`` is called again for every step in the reverse sweep and must be deterministic given
(phi, t): draw noise and timesteps from a generator seeded by t, never from the global RNG.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from resalign_fast.inner.optim import OptimSpec, OptState, init_state, step, step_

__all__ = ["unrolled_hypergrad"]

FtLoss = Callable[[list[Tensor], int], Tensor]
OuterLoss = Callable[[list[Tensor], list[Tensor]], Tensor]


def _scalar(value: Tensor, what: str) -> Tensor:
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise ValueError(
            f"{what} must return a scalar tensor, got "
            f"{type(value).__name__}{'' if not isinstance(value, Tensor) else tuple(value.shape)}"
        )
    if not value.requires_grad:
        raise ValueError(
            f"{what} does not depend on its parameters (its result does not require grad)"
        )
    return value.reshape(())


def _zeros_for_none(grads: tuple[Tensor | None, ...], like: list[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, like)]


def _ft_grad(ft_loss: FtLoss, phi: list[Tensor], t: int, create_graph: bool) -> list[Tensor]:
    """grad ft_loss(phi, t) w.r.t. phi (phi must require grad); zeros for unused tensors."""
    loss = _scalar(ft_loss(phi, t), f"ft_loss(phi, {t})")
    grads = torch.autograd.grad(loss, phi, create_graph=create_graph, allow_unused=True)
    return _zeros_for_none(grads, phi)


def _simulate_(
    spec: OptimSpec,
    phi: list[Tensor],
    state: OptState,
    ft_loss: FtLoss,
    t0: int,
    t1: int,
    snapshots: list[tuple[list[Tensor], OptState]] | None = None,
) -> None:
    """Steps t0 .. t1-1 in place without a graph; appends (phi_t, s_t) snapshots if asked."""
    for t in range(t0, t1):
        if snapshots is not None:
            snapshots.append(([p.detach().clone() for p in phi], state.clone()))
        leaves = [p.detach().requires_grad_() for p in phi]  # views sharing storage with phi
        step_(spec, phi, _ft_grad(ft_loss, leaves, t, create_graph=False), state)


def _full(
    theta: list[Tensor],
    outer_loss: OuterLoss,
    ft_loss: FtLoss,
    spec: OptimSpec,
    steps: int,
    start: int,
) -> list[Tensor]:
    theta_ = [x.detach().clone().requires_grad_() for x in theta]
    phi = [x.detach().clone() for x in theta]
    state = init_state(spec, phi)
    _simulate_(spec, phi, state, ft_loss, 0, start)
    if start > 0:
        # Identity path: value phi_start exactly (x + 0 == x), derivative I w.r.t. theta.
        phi = [p + (th - th.detach()) for p, th in zip(phi, theta_)]
    else:
        phi = theta_
    for t in range(start, steps):
        phi, state = step(spec, phi, _ft_grad(ft_loss, phi, t, create_graph=True), state)
    loss = _scalar(outer_loss(theta_, phi), "outer_loss(theta, phi_T)")
    return _zeros_for_none(torch.autograd.grad(loss, theta_, allow_unused=True), theta_)


def _checkpointed(
    theta: list[Tensor],
    outer_loss: OuterLoss,
    ft_loss: FtLoss,
    spec: OptimSpec,
    steps: int,
    start: int,
) -> list[Tensor]:
    phi = [x.detach().clone() for x in theta]
    state = init_state(spec, phi)
    _simulate_(spec, phi, state, ft_loss, 0, start)
    snapshots: list[tuple[list[Tensor], OptState]] = []
    _simulate_(spec, phi, state, ft_loss, start, steps, snapshots)
    del state

    n = len(theta)
    theta_ = [x.detach().clone().requires_grad_() for x in theta]
    phi_T = [p.detach().requires_grad_() for p in phi]
    loss = _scalar(outer_loss(theta_, phi_T), "outer_loss(theta, phi_T)")
    grads = _zeros_for_none(
        torch.autograd.grad(loss, theta_ + phi_T, allow_unused=True), theta_ + phi_T
    )
    direct, a_phi = grads[:n], grads[n:]
    del loss, phi_T, phi
    # Adjoint of s_{t+1}; s_T does not enter outer_loss. None stands for a zero adjoint.
    a_state: list[Tensor | None] = [None] * (len(snapshots[-1][1].tensors()) if snapshots else 0)

    for t in reversed(range(start, steps)):
        phi_t, s_t = snapshots.pop()
        phi_t = [p.requires_grad_() for p in phi_t]
        s_in = [s.requires_grad_() for s in s_t.tensors()]
        new_phi, new_s = step(
            spec, phi_t, _ft_grad(ft_loss, phi_t, t, create_graph=True), s_t.with_tensors(s_in)
        )
        outs, adjs = [], []
        for out, adj in zip(new_phi + new_s.tensors(), a_phi + a_state):
            if adj is not None and out.requires_grad:
                outs.append(out)
                adjs.append(adj)
        pulled = (
            torch.autograd.grad(outs, phi_t + s_in, adjs, allow_unused=True)
            if outs
            else (None,) * (n + len(s_in))
        )
        a_phi = _zeros_for_none(pulled[:n], phi_t)
        a_state = list(pulled[n:])
        del new_phi, new_s, outs, adjs, pulled

    # phi_start = theta (start == 0), or theta + const under truncation: identity either way.
    return [d + a for d, a in zip(direct, a_phi)]


def unrolled_hypergrad(
    theta: list[Tensor],
    outer_loss: OuterLoss,
    ft_loss: FtLoss,
    spec: OptimSpec,
    steps: int,
    *,
    truncate: int | None = None,
    checkpoint: bool = True,
) -> list[Tensor]:
    """Hypergradient by differentiating through ``steps`` simulated optimizer steps.

    Args:
        theta: Start of fine-tuning (phi_0 = theta), a list of tensors of any shapes. Not modified.
        outer_loss: ``outer_loss(theta, phi_T) -> scalar``, both arguments lists shaped like theta.
        ft_loss: ``ft_loss(phi, t) -> scalar``, the fine-tuning loss at step t (batches may differ
            per step). Must be deterministic given (phi, t): the checkpointed mode calls it twice
            per step.
        spec: The simulated optimizer; its state starts fresh (:func:`init_state`).
        steps: Number of fine-tuning steps T >= 0.
        truncate: None (or any value >= steps) differentiates through all T steps. An integer
            T' in [0, T) differentiates only through the last T' steps: steps 0 .. T-T'-1 run
            without a graph, and then phi_{T-T'} is treated as theta + constant (its Jacobian with
            respect to theta is taken as the identity, the path that holds exactly when the early
            steps do not move phi) and the optimizer state s_{T-T'} as a constant. The direct
            dependence of outer_loss on theta is always kept. truncate=0 thus gives the first-order
            answer d_theta outer + d_phi outer, both evaluated at (theta, phi_T).
        checkpoint: True: activation memory independent of T (snapshots plus per-step recompute
            and vector-Jacobian products). False: one graph over the whole trajectory (the
            reference).

    Returns:
        d outer_loss(theta, phi_T(theta)) / d theta: detached tensors shaped like theta.

    Raises:
        ValueError: bad steps/truncate, empty or non-floating theta, or a loss that is not a
            scalar depending on its parameters.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if truncate is not None and (
        isinstance(truncate, bool) or not isinstance(truncate, int) or truncate < 0
    ):
        raise ValueError(f"truncate must be None or an int >= 0, got {truncate!r}")
    if not theta or not all(isinstance(x, Tensor) and x.is_floating_point() for x in theta):
        raise ValueError("theta must be a non-empty list of floating-point tensors")
    start = 0 if truncate is None else max(0, steps - truncate)
    with torch.enable_grad():
        impl = _checkpointed if checkpoint else _full
        return [g.detach() for g in impl(list(theta), outer_loss, ft_loss, spec, steps, start)]
