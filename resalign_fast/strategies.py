"""The typed phases of one outer step and the table of hypergradient strategies.

An outer step (`bilevel.ResAlign.step`) runs `direct_grad` once, then `config_hypergrad` for each
sampled configuration C, which looks C's strategy up in `STRATEGIES`:

* "plain": lambda = 0, plain unlearning; g_C is the direct gradient, nothing is simulated.
* "first_order": simulate (`in_place` under lean_full), then b = lambda grad L_h(theta*) pulled
  back to theta (no solve).
* "implicit": simulate on copies, then the guarded solve of (I + gamma H) v = b at theta*.
* "implicit_inplace": the same on the UNet's own weights (`lean_full`, full-parameter C): the
  starting weights wait in host memory, the optimizer steps inside the backward pass and the fd
  HVPs perturb the weights in place.
* "unrolled": backpropagation through the simulated steps.

Each strategy is ``strategy(trainer, task) -> ConfigResult``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from resalign_fast.hypergrad import unrolled_hypergrad
from resalign_fast.inner.configs import FTConfig
from resalign_fast.inner.inplace import host_backup, restore, simulate_inplace
from resalign_fast.inner.simulate import InnerProblem, ft_batch, ft_loss, optim_spec
from resalign_fast.models.prepare import pass_attention
from resalign_fast.objectives import NoisyBatch

if TYPE_CHECKING:
    from resalign_fast.bilevel import ResAlign


class SimulationFault(ArithmeticError):
    """One configuration's simulated fine-tuning went non-finite (handled per nan_policy by
    `step`)."""


@dataclass
class DirectGrad:
    """What `ResAlign.direct_grad` computes at theta for outer step `step`.

    Attributes:
        theta: detached leaves of theta that require grad (the point every configuration starts
            from).
        grads: (1 - lambda) grad L_h(theta) + w_r grad R(theta), shaped like theta.
        harmful_batch: the L_h batch, reused for L_h(theta*).
        harmful, preserve: L_h(theta) and R(theta).
        w_r: the preservation weight of this step.
    """

    step: int
    theta: list[Tensor]
    grads: list[Tensor]
    harmful_batch: NoisyBatch
    harmful: float
    preserve: float
    w_r: float

    def finite(self) -> bool:
        """L_h, R and the direct gradient are all finite."""
        return (
            math.isfinite(self.harmful)
            and math.isfinite(self.preserve)
            and all(torch.isfinite(g).all() for g in self.grads)
        )


@dataclass
class ConfigTask:
    """One sampled configuration of an outer step, as a strategy receives it.

    Attributes:
        config: the configuration C.
        problem: C's inner space and maps (`inner.simulate.inner_problem`).
        direct: the step's direct gradient at theta.
        gen: C's own generator (`bilevel.config_generator`).
        slot: the configuration's index in the step (keys warm starts and ft_carry).
    """

    config: FTConfig
    problem: InnerProblem
    direct: DirectGrad
    gen: torch.Generator
    slot: int = 0


@dataclass
class ConfigResult:
    """One configuration's hypergradient and what it cost.

    Attributes:
        grad: g_C on theta (direct gradient included); NaN-filled after a `SimulationFault`.
        lh_star: L_h(theta*), None where nothing was simulated.
        retries, fallback, hvps: the solver guard's counts (`hypergrad.guard.GuardInfo`).
        fault: why the simulation failed, "" when it did not.
    """

    grad: list[Tensor] = field(default_factory=list)
    lh_star: float | None = None
    retries: int = 0
    fallback: bool = False
    hvps: int = 0
    fault: str = ""


@dataclass
class StepResult:
    """What one outer step measured (one line of metrics.jsonl)."""

    step: int
    harmful: float
    preserve: float
    w_r: float
    recovered: list[float] = field(default_factory=list)
    configs: list[str] = field(default_factory=list)
    hypergrad_norm: float = 0.0
    direct_norm: float = 0.0
    retries: int = 0
    fallbacks: int = 0
    hvps: int = 0
    skipped: bool = False
    seconds: float = 0.0
    peak_memory_bytes: int = 0


def plain(trainer: ResAlign, task: ConfigTask) -> ConfigResult:
    """lambda = 0: the resilience term vanishes; g_C is the direct gradient."""
    return ConfigResult([d.detach().clone() for d in task.direct.grads])


@contextlib.contextmanager
def on_copies(trainer: ResAlign, task: ConfigTask) -> Iterator[list[Tensor]]:
    """theta* simulated on copies of the inner space's weights (`ResAlign.simulate`)."""
    yield trainer.simulate(task)


@contextlib.contextmanager
def in_place(trainer: ResAlign, task: ConfigTask) -> Iterator[list[Tensor]]:
    """theta* simulated on the UNet's own weights (lean_full): the starting weights wait in host
    memory, the optimizer steps inside the backward pass; restored when the block ends."""
    cfg, c = trainer.cfg, task.config
    params = task.problem.space.values()
    flags = [p.requires_grad for p in params]
    backup = host_backup(params)
    try:
        with trainer.phase("simulate"):
            with torch.no_grad():
                for p, x in zip(params, task.problem.phi0(task.direct.theta)):
                    if x.data_ptr() != p.data_ptr():  # theta LoRA: the merged weights
                        p.copy_(x)
            for p in params:
                p.requires_grad_(True)

            def loss() -> Tensor:
                data = trainer.data
                batch = ft_batch(c, data["ft"], data["preserve"], trainer.alphas, task.gen)
                return ft_loss(task.problem.space, params, c, batch)

            with pass_attention(cfg.attention, False):
                simulate_inplace(
                    params, loss, optim_spec(c), c.steps, offload=cfg.offload_optimizer_state
                )
        yield params
    finally:
        restore(params, backup)
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def inplace_simulation(cfg, config: FTConfig) -> bool:
    """Whether configuration `config` is simulated `in_place` under run config `cfg`."""
    return bool(cfg.lean_full) and config.algorithm == "full"


def first_order(trainer: ResAlign, task: ConfigTask) -> ConfigResult:
    """Simulate, then the outer gradient at theta* pulled back without a solve."""
    simulation = in_place if inplace_simulation(trainer.cfg, task.config) else on_copies
    with simulation(trainer, task) as phi_star, trainer.phase("hypergradient"):
        b, lh_star = trainer.outer_gradient(task, phi_star)
        v = task.problem.pullback(b)
        return ConfigResult([d + x for d, x in zip(task.direct.grads, v)], lh_star)


def implicit(trainer: ResAlign, task: ConfigTask) -> ConfigResult:
    """Simulate on copies, then the guarded implicit solve at theta*."""
    with on_copies(trainer, task) as phi_star, trainer.phase("hypergradient"):
        return trainer.implicit_solve(task, phi_star, inplace=False)


def implicit_inplace(trainer: ResAlign, task: ConfigTask) -> ConfigResult:
    """`implicit` on the UNet's own weights (lean_full, full-parameter configurations): the fd
    HVPs perturb the weights in place."""
    with in_place(trainer, task) as phi_star, trainer.phase("hypergradient"):
        return trainer.implicit_solve(task, phi_star, inplace=True)


def unrolled(trainer: ResAlign, task: ConfigTask) -> ConfigResult:
    """Backpropagation through the simulated steps (activation memory independent of steps)."""
    cfg, c, prob = trainer.cfg, task.config, task.problem
    with trainer.phase("hypergradient"), pass_attention(cfg.attention, False):
        data = trainer.data
        batches = [
            ft_batch(c, data["ft"], data["preserve"], trainer.alphas, task.gen)
            for _ in range(c.steps)
        ]
        hb = task.direct.harmful_batch

        def outer(th: list[Tensor], phi: list[Tensor]) -> Tensor:
            return cfg.lam * trainer.harmful_loss(prob.space, phi, hb)

        def inner(phi: list[Tensor], t: int) -> Tensor:
            return ft_loss(prob.space, phi, c, batches[t])

        phi0 = [p.detach() for p in prob.phi0(task.direct.theta)]
        with pass_attention(cfg.attention, True):
            v = unrolled_hypergrad(
                phi0, outer, inner, optim_spec(c), c.steps, truncate=cfg.unroll_steps or None
            )
        return ConfigResult([d + x for d, x in zip(task.direct.grads, prob.pullback(v))])


Strategy = Callable[["ResAlign", ConfigTask], ConfigResult]

STRATEGIES: dict[str, Strategy] = {
    "plain": plain,
    "first_order": first_order,
    "implicit": implicit,
    "implicit_inplace": implicit_inplace,
    "unrolled": unrolled,
}


def strategy_for(cfg, config: FTConfig) -> str:
    """The `STRATEGIES` key for configuration `config` under run config `cfg` (a ResAlignConfig)."""
    if cfg.lam == 0:
        return "plain"
    if cfg.hypergrad == "unrolled":
        return "unrolled"
    if cfg.hypergrad == "first_order":
        return "first_order"
    if inplace_simulation(cfg, config):
        return "implicit_inplace"
    return "implicit"
