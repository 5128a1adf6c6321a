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

Optimizer state in host memory (``simulate_inplace(..., offload=True)``, config field
``offload_optimizer_state``): Adam's two moments (SGD's momentum buffer) are another two copies of
the UNet (6.4 GiB for SD v1.4). Offloaded, they live in host memory (pinned when CUDA is present)
and are streamed per parameter inside the hook: copied to the device, stepped by the same kernel,
copied back. Only one parameter's state is on the device at a time, and the values are those of the
on-device path bit for bit (same kernel, same inputs; the first step starts from zeros on the device
and skips the upload). The cost is one upload and one download of the state per parameter and step
(on CPU, where host and device are one memory, two extra copies: measured in RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from resalign_fast.inner.optim import OptimSpec, OptState, init_state, step_

__all__ = ["backward_into", "host_backup", "host_empty", "restore", "simulate_inplace"]


def backward_into(
    params: Sequence[Tensor], loss: Tensor, on_grad: Callable[[int, Tensor], None]
) -> None:
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


def host_empty(like: Tensor) -> Tensor:
    """An uninitialised tensor shaped like `like` in host memory (pinned when CUDA is present), or
    on `like`'s own device when that is the CPU or meta (the planner counts it as host memory by
    running this under `StorageTracker.host`)."""
    if like.device.type in ("cpu", "meta"):
        return torch.empty_like(like, memory_format=torch.contiguous_format)
    return torch.empty(like.shape, dtype=like.dtype, pin_memory=torch.cuda.is_available())


def host_backup(params: Sequence[Tensor]) -> list[Tensor]:
    """Copies of params in host memory (pinned when CUDA is present); plain clones on CPU/meta."""
    with torch.no_grad():
        return [host_empty(p).copy_(p) for p in params]


def restore(params: Sequence[Tensor], backup: list[Tensor]) -> None:
    """Copy `backup` back into params and empty the list (its memory is freed)."""
    with torch.no_grad():
        for p, w in zip(params, backup):
            p.copy_(w)
    backup.clear()


def simulate_inplace(
    params: Sequence[Tensor],
    loss_fn: Callable[[], Tensor],
    spec: OptimSpec,
    steps: int,
    *,
    offload: bool = False,
) -> None:
    """`steps` optimizer steps on params in place, each parameter stepped inside the backward pass.

    Same update as `simulate_finetune` with plain steps (per-parameter states of `inner.optim`,
    which steps every tensor independently).

    Args:
        params: leaf tensors that require grad (a module's parameters), updated in place.
        loss_fn: ``loss_fn() -> Tensor``, the fine-tuning loss of one step (a fresh batch per call)
            at the current values of params.
        spec: the simulated optimizer.
        steps: number of steps.
        offload: keep the optimizer state in host memory and stream it per parameter (see the
            module docstring); the trajectory is the same bit for bit.
    """
    params = list(params)
    if offload:
        simulate_offloaded(params, loss_fn, spec, steps)
        return
    states = [init_state(spec, [p]) for p in params]

    def step(i: int, g: Tensor) -> None:
        step_(spec, [params[i]], [g], states[i])

    for _ in range(steps):
        backward_into(params, loss_fn(), step)


def simulate_offloaded(
    params: list[Tensor], loss_fn: Callable[[], Tensor], spec: OptimSpec, steps: int
) -> None:
    """`simulate_inplace` with each parameter's state in host memory between its steps."""
    names = sorted(
        init_state(spec, []).buffers
    )  # the buffers of `spec` ("exp_avg", "exp_avg_sq", ...)
    host: list[dict[str, Tensor]] = [{} for _ in params]  # filled at each parameter's first step
    counts = [0] * len(params)
    blocking = not (params and params[0].is_cuda)

    def step(i: int, g: Tensor) -> None:
        p = params[i]
        with torch.no_grad():
            if counts[i] == 0:  # a fresh state is zeros: made on the device, nothing to upload
                dev = {n: torch.zeros_like(p, memory_format=torch.contiguous_format) for n in names}
            else:
                dev = {
                    n: host[i][n].to(p.device, non_blocking=not blocking, copy=True) for n in names
                }
            state = OptState(counts[i], {n: [dev[n]] for n in names})
            step_(spec, [p], [g], state)
            counts[i] = state.step
            for n in names:
                if n not in host[i]:
                    host[i][n] = host_empty(p)
                # on CUDA the download is queued on the stream; the next upload of this buffer is
                # queued after it, and the device copy's memory is reused only after it runs
                host[i][n].copy_(dev[n], non_blocking=not blocking)
            del dev, state

    for _ in range(steps):
        backward_into(params, loss_fn(), step)
    if params and params[0].is_cuda:
        torch.cuda.current_stream(
            params[0].device
        ).synchronize()  # downloads done before the state is freed
