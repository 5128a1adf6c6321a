"""PLANNER PROTOTYPE (not the project's code): a full-parameter configuration in ~4 weight copies.

With the project's `make_hvp` a full-parameter configuration holds, besides the weights, the
starting-weights backup, b, v, and the HVP's internals (the fd backend: both perturbed copies and
both gradients; exact/jvp: the gradient with its graph and the product), 30+ GiB for SD v1.4. This
module runs the same step in the smallest layout we know, so that the planner can show what a
memory-lean implementation would reach (recipe flag `lean_full`, fd HVPs only):

* the starting weights W0 are copied to host memory (pinned, on a GPU) and copied back at the end;
* simulation: each parameter's optimizer step runs in a post-accumulate-grad hook, so no full set
  of gradients ever exists (optimizer-in-backward, one `OptState` per parameter);
* fd HVPs in place: theta* += eps v, backward (term by term) with hooks adding each gradient into
  the buffer d; theta* -= 2 eps v, backward with hooks subtracting; theta* += eps v. Then
  v <- v + alpha (b - v - gamma d / (2 eps)) in place. Live full-size vectors: weights, b, v, d.

Restoring theta* by +eps v after -2 eps v is exact only up to rounding (about 1 ulp per HVP).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from resalign_fast.memplan.tracker import StorageTracker


def _backward_with_hooks(params: list[Tensor], loss_fn: Callable[[], Tensor],
                         on_grad: Callable[[int, Tensor], None]) -> None:
    """loss_fn().backward(), handing each parameter's gradient to on_grad(i, g) as soon as it is
    accumulated and dropping it from .grad."""
    def hook_for(i: int):
        def hook(p: Tensor) -> None:
            on_grad(i, p.grad)
            p.grad = None
        return hook

    handles = [p.register_post_accumulate_grad_hook(hook_for(i)) for i, p in enumerate(params)]
    try:
        loss_fn().backward()
    finally:
        for h in handles:
            h.remove()


def lean_simulate(params: list[Tensor], optim_name: str, steps: int, loss_fn: Callable[[], Tensor],
                  tracker: StorageTracker | None) -> list[Tensor]:
    """Optimizer-in-backward simulation from a host backup of the starting values.

    Returns:
        The host backup (restore with `restore`).
    """
    from resalign_fast.inner import optim

    host = tracker.host() if tracker is not None else torch.no_grad()
    with torch.no_grad(), host:
        backup = [p.detach().clone() for p in params]  # on a GPU: .to("cpu", non_blocking=True)
    spec = optim.OptimSpec(optim_name, lr=1e-5)
    states = [optim.init_state(spec, [p]) for p in params]
    for p in params:
        p.requires_grad_(True)

    def step(i: int, g: Tensor) -> None:
        with torch.no_grad():
            optim.step_(spec, [params[i]], [g], states[i])

    for _ in range(steps):
        _backward_with_hooks(params, loss_fn, step)
    return backup


def lean_fd_richardson(params: list[Tensor], b: list[Tensor], terms: list[Callable[[], Tensor]], *,
                       iters: int, alpha: float, gamma: float) -> list[Tensor]:
    """K Richardson iterations on (I + gamma H) v = b with in-place central-difference HVPs.

    Args:
        params: theta* (module parameters, perturbed in place and put back).
        b: right-hand side, shaped like params.
        terms: the fine-tuning loss as a sum of terms at the module's current parameters; each
            is differentiated on its own (DreamBooth's two passes never hold both graphs).
        iters: K; v_1 = alpha b needs no HVP.
        alpha, gamma: Richardson step and proximal weight.

    Returns:
        v_K.
    """
    from resalign_fast.hypergrad.hvp import fd_eps  # the project's step rule

    with torch.no_grad():
        v = [alpha * x for x in b]
    for _ in range(iters - 1):
        eps = fd_eps(params, v)
        hv: list[Tensor | None] = [None] * len(params)

        def plus(i: int, g: Tensor) -> None:
            hv[i] = g if hv[i] is None else hv[i].add_(g)

        def minus(i: int, g: Tensor) -> None:
            hv[i].sub_(g)

        for sign, on_grad in ((1.0, plus), (-2.0, minus)):
            with torch.no_grad():
                for p, x in zip(params, v):
                    p.add_(x, alpha=sign * eps)
            for term in terms:
                _backward_with_hooks(params, term, on_grad)
        with torch.no_grad():
            for p, x, h, bi in zip(params, v, hv, b):
                p.add_(x, alpha=eps)
                x.mul_(1 - alpha).add_(bi, alpha=alpha).add_(h, alpha=-alpha * gamma / (2 * eps))
        del hv
    return v


def restore(params: list[Tensor], backup: list[Tensor]) -> None:
    """Copy the host backup back into the parameters and empty it."""
    with torch.no_grad():
        for p, w in zip(params, backup):
            p.copy_(w)
    backup.clear()
