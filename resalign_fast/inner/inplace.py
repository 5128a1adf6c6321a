"""Fine-tuning simulation in place on a module's own parameters (full-parameter configurations).

The ordinary simulation (`simulate.simulate_finetune`) copies the starting point, keeps a full set
of gradients per step and the optimizer state beside it. For a full-parameter configuration of
SD v1.4 each of those is a copy of the UNet (859.5M numbers, 3.2 GiB in fp32). Here:

* the starting weights go to host memory (`host_backup`, CPU when the weights are on an
  accelerator) and come back with `restore`;
* each parameter's optimizer step runs in a post-accumulate-grad hook (`backward_into`), as soon
  as its gradient is complete, so no full set of gradients ever exists (optimizer-in-backward).

A step's gradient must be whole before its hook steps, so a step's loss terms (DreamBooth's
instance and prior terms) are differentiated together here; splitting them would hold a full
gradient buffer (3.2 GiB for SD v1.4) instead of a second forward graph.
The in-place finite-difference HVP that follows the simulation is `hypergrad.hvp`'s ``inplace``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from resalign_fast.inner.optim import OptimSpec, init_state, step_

__all__ = ["backward_into", "host_backup", "restore", "simulate_inplace"]


def backward_into(params: Sequence[Tensor], loss: Tensor, on_grad: Callable[[int, Tensor], None]) -> None:
    """Backward of `loss` into `params` only, handing over each gradient as soon as it is complete.

    Args:
        params: leaf tensors that require grad, with ``.grad`` None.
        loss: 0-d tensor computed from params.
        on_grad: called as ``on_grad(i, g)`` once per parameter i that the loss uses; g is the
            complete gradient, owned by the callee (``params[i].grad`` is None again afterwards).
            Unused parameters get no call.

    Raises:
        ValueError: a parameter already holds a gradient (it would be added to the new one).
    """
    params = list(params)
    if any(p.grad is not None for p in params):
        raise ValueError("backward_into: a parameter already holds a .grad; clear it first")

    def hook_for(i: int):
        def hook(p: Tensor) -> None:
            g, p.grad = p.grad, None
            on_grad(i, g)
        return hook

    handles = [p.register_post_accumulate_grad_hook(hook_for(i)) for i, p in enumerate(params)]
    try:
        torch.autograd.backward(loss, inputs=params)
    finally:
        for h in handles:
            h.remove()


def host_backup(params: Sequence[Tensor]) -> list[Tensor]:
    """Copies of params in host memory (pinned when CUDA is present); plain clones on CPU/meta."""
    with torch.no_grad():
        if params and params[0].device.type not in ("cpu", "meta"):
            pin = torch.cuda.is_available()
            return [torch.empty(p.shape, dtype=p.dtype, pin_memory=pin).copy_(p) for p in params]
        return [p.detach().clone() for p in params]


def restore(params: Sequence[Tensor], backup: list[Tensor]) -> None:
    """Copy `backup` back into params and empty the list (its memory is freed)."""
    with torch.no_grad():
        for p, w in zip(params, backup):
            p.copy_(w)
    backup.clear()


def simulate_inplace(params: Sequence[Tensor], loss_fn: Callable[[], Tensor], spec: OptimSpec,
                     steps: int) -> None:
    """`steps` optimizer steps on params in place, each parameter stepped inside the backward pass.

    Same update as `simulate_finetune` with plain steps (per-parameter states of `inner.optim`,
    which steps every tensor independently).

    Args:
        params: leaf tensors that require grad (a module's parameters), updated in place.
        loss_fn: ``loss_fn() -> Tensor``, the fine-tuning loss of one step (a fresh batch per call)
            at the current values of params.
        spec: the simulated optimizer.
        steps: number of steps.
    """
    params = list(params)
    states = [init_state(spec, [p]) for p in params]

    def step(i: int, g: Tensor) -> None:
        step_(spec, [params[i]], [g], states[i])

    for _ in range(steps):
        backward_into(params, loss_fn(), step)
