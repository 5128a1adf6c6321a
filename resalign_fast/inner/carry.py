"""ft_carry: a configuration slot's simulated fine-tuning continued across outer steps.

`carry` is the trainer's dict (checkpointed with the run): per slot, the configuration it ran,
the steps accumulated, the optimizer's step count and buffers, and the displacement theta* - phi0,
all in host memory. The displacement is added to the next step's phi0, since theta moved.
"""

from __future__ import annotations

import torch
from torch import Tensor

from resalign_fast.inner.configs import FTConfig
from resalign_fast.inner.optim import OptState, init_state
from resalign_fast.inner.simulate import optim_spec


def carried_start(
    carry: dict[str, dict], limit: int, slot: str, c: FTConfig, phi0: list[Tensor]
) -> tuple[list[Tensor] | None, OptState]:
    """(start, optimizer state) continuing the slot's last simulation when it ran the same
    configuration and c.steps more stay within `limit` accumulated steps (0: no carry); else a
    fresh start (None, a new state)."""
    prev = carry.get(slot)
    if not limit or prev is None or prev["config"] != c.short() or prev["steps"] + c.steps > limit:
        return None, init_state(optim_spec(c), phi0)
    dev = phi0[0].device
    start = [p + d.to(dev) for p, d in zip(phi0, prev["delta"])]
    buffers = {k: [x.to(dev) for x in v] for k, v in prev["buffers"].items()}
    return start, OptState(prev["opt_step"], buffers)


def record_carry(
    carry: dict[str, dict],
    slot: str,
    c: FTConfig,
    *,
    continued: bool,
    phi0: list[Tensor],
    phi_star: list[Tensor],
    state: OptState,
) -> None:
    """Keep the slot's simulation (theta* from phi0, optimizer `state`) for the next outer step;
    `continued`: it went on from the carried start. A non-finite theta* is dropped (the slot
    restarts next time; the trainer reports the fault)."""
    if not all(torch.isfinite(p).all() for p in phi_star):
        carry.pop(slot, None)
        return
    done = (carry.get(slot, {}).get("steps", 0) if continued else 0) + c.steps
    carry[slot] = {
        "config": c.short(),
        "steps": done,
        "opt_step": state.step,
        "delta": [(a - b).cpu() for a, b in zip(phi_star, phi0)],
        "buffers": {k: [x.cpu() for x in v] for k, v in state.buffers.items()},
    }
