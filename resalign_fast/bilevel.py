"""One ResAlign outer step (METHOD.md, Algorithm 2): sample configs -> simulate -> objectives ->
hypergradient -> AdamW update of theta.

    g = (1 - lambda) grad L_h(theta) + w_r grad R(theta) + mean_i pullback_i( (I + gamma H_i)^-1
    lambda grad L_h(theta*_i) )
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import Tensor

from resalign_fast.config import ResAlignConfig
from resalign_fast.data.encoded import EncodedSet
from resalign_fast.distributed import DistContext
from resalign_fast.hypergrad import guarded_hypergrad, make_hvp
from resalign_fast.hypergrad.stable import stable_hypergrad
from resalign_fast.hypergrad.vec import norm
from resalign_fast.inner.carry import carried_start, record_carry
from resalign_fast.inner.configs import FTConfig, FTSpace
from resalign_fast.inner.inplace import host_backup
from resalign_fast.inner.simulate import (
    ft_batch,
    ft_terms,
    inner_problem,
    simulate_finetune,
    sum_terms,
)
from resalign_fast.models.prepare import pass_attention, prepare_unet
from resalign_fast.objectives import (
    sigmoid_ramp,
    target_loss,
)
from resalign_fast.strategies import (
    STRATEGIES,
    ConfigResult,
    ConfigTask,
    DirectGrad,
    SimulationFault,
    StepResult,
    strategy_for,
)
from resalign_fast.unlearning import UnlearningObjectives

__all__ = [
    "ConfigResult",
    "ConfigTask",
    "DirectGrad",
    "NumericalError",
    "ResAlign",
    "StepResult",
    "config_generator",
    "step_generator",
]

log = logging.getLogger("resalign_fast.bilevel")


class NumericalError(RuntimeError):
    """A NaN or inf in a loss or hypergradient (the message names the step and configuration)."""


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of outer step `step`: its L_h and R batches, then its configurations."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def config_generator(seed: int, step: int, i: int) -> torch.Generator:
    """The generator of configuration i of outer step `step`: its batches do not depend on the other
    configurations, so any rank can compute it (distributed.py). i < 2**20."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) << 20) + i)


def _no_phase(name: str) -> AbstractContextManager:
    return contextlib.nullcontext()


class ResAlign(UnlearningObjectives):
    """Holds theta, its optimizer and the encoded data; `step(s)` runs outer step s.

    The step's phases are public and typed: `direct_grad` (at theta), then per configuration
    `config_hypergrad` -> `ConfigResult`, which runs the configuration's strategy
    (`strategies.STRATEGIES`) built from `simulate`, `outer_gradient` and `implicit_solve`.

    Args:
        cfg: the run configuration.
        model: a `DiffusionModel` (its UNet gets theta's adapter when cfg.theta == "lora").
        data: {"harmful", "preserve", "ft"} -> EncodedSet (D_preserve doubles as DreamBooth class
            data).
        ft_space: pi(C).
        uncond_emb: (1, L, D) empty-prompt embedding (ESD).
        dist: the process group over which the k configurations are spread (None: one process).

    Attributes:
        phase: ``phase(name) -> context manager`` entered around each phase ("direct gradient",
            "simulate", "hypergradient"); the memory planner labels its trace with it.
    """

    def __init__(
        self,
        cfg: ResAlignConfig,
        model,
        data: dict[str, EncodedSet],
        ft_space: FTSpace,
        *,
        uncond_emb: Tensor,
        dist: DistContext | None = None,
    ) -> None:
        self.cfg, self.model, self.data, self.ft_space = cfg, model, data, ft_space
        self.dist = dist or DistContext()
        self.uncond = uncond_emb
        self.prepared = prepare_unet(model.unet, cfg, getattr(model, "frozen_dtype", torch.float32))
        self.space = self.prepared.space
        self.theta = self.space.values()
        self.opt = torch.optim.AdamW(self.theta, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.alphas = model.scheduler.alphas_cumprod.float().to(self.theta[0].device)
        # stable guard: the last top-curvature eigenvector per configuration slot and inner space
        # (host
        # memory; checkpointed by rank 0, so a distributed resume restarts the other ranks' slots
        # cold)
        self.warm_vectors: dict[str, list[Tensor]] = {}
        # ft_carry: per configuration slot, the simulation to continue (checkpointed like
        # warm_vectors)
        self.carry: dict[str, dict] = {}
        self.phase: Callable[[str], AbstractContextManager] = _no_phase

    # --- the phases ----------------------------------------------------------------------------
    def direct_grad(self, s: int, gen: torch.Generator) -> DirectGrad:
        """L_h and R at theta and the direct gradient (1 - lambda) grad L_h + w_r grad R; the
        batches come from `gen` (the step's generator)."""
        cfg = self.cfg
        w_r = sigmoid_ramp(s, cfg.outer_steps, cfg.w_r_start, cfg.w_r_end)
        hb, pb = self.harmful_batch(gen), self.preserve_batch(gen)
        theta = [p.detach().requires_grad_(True) for p in self.theta]
        with pass_attention(cfg.attention, False):
            lh = self.harmful_loss(self.space, theta, hb)
            r = target_loss(self.space.eps(theta, pb.x_t, pb.t, pb.emb), pb)
            grads = torch.autograd.grad((1 - cfg.lam) * lh + w_r * r, theta)
        return DirectGrad(s, theta, list(grads), hb, lh.item(), r.item(), w_r)

    def config_hypergrad(
        self, c: FTConfig, direct: DirectGrad, gen: torch.Generator, slot: int = 0
    ) -> ConfigResult:
        """Hypergradient g_C of configuration c, by its strategy (`strategies.strategy_for`).

        A simulated fine-tuning that ends in a non-finite theta* or L_h(theta*) gives a result with
        `fault` set and a NaN gradient (the solver guard would otherwise hide it).
        """
        prob = inner_problem(self.space, self.cfg.theta, c.algorithm, direct.theta)
        task = ConfigTask(c, prob, direct, gen, slot)
        try:
            return STRATEGIES[strategy_for(self.cfg, c)](self, task)
        except SimulationFault as e:
            return ConfigResult(
                [torch.full_like(p, float("nan")) for p in self.theta], fault=str(e)
            )

    def simulate(self, task: ConfigTask) -> list[Tensor]:
        """theta* of the task's configuration, simulated on copies (continuing the slot's last
        simulation under ft_carry); detached leaves that require grad."""
        cfg, c = self.cfg, task.config
        phi0 = [p.detach() for p in task.problem.phi0(task.direct.theta)]
        slot = str(task.slot)
        start, state = carried_start(self.carry, cfg.ft_carry, slot, c, phi0)
        prox = cfg.gamma if cfg.proximal else None
        with self.phase("simulate"), pass_attention(cfg.attention, False):
            phi_star = simulate_finetune(
                task.problem.space,
                phi0,
                c,
                self.data["ft"],
                self.data["preserve"],
                self.alphas,
                task.gen,
                proximal_gamma=prox,
                split_terms=cfg.split_terms,
                start=start,
                state=state,
            )
        if cfg.ft_carry:
            record_carry(
                self.carry,
                slot,
                c,
                continued=start is not None,
                phi0=phi0,
                phi_star=phi_star,
                state=state,
            )
        return [p.requires_grad_(True) for p in phi_star]

    def outer_gradient(
        self, task: ConfigTask, phi_star: list[Tensor]
    ) -> tuple[list[Tensor], float]:
        """b = lambda grad L_h(theta*) and L_h(theta*), at theta* (leaves that require grad).

        Raises:
            SimulationFault: theta* or L_h(theta*) is not finite.
        """
        with pass_attention(self.cfg.attention, False):
            if not all(torch.isfinite(p).all() for p in phi_star):
                raise SimulationFault("simulated fine-tuning produced non-finite weights")
            lh_star = self.harmful_loss(task.problem.space, phi_star, task.direct.harmful_batch)
            if not torch.isfinite(lh_star):
                raise SimulationFault(f"L_h(theta*) = {lh_star.item()}")
            b = [self.cfg.lam * x for x in torch.autograd.grad(lh_star, phi_star)]
        return b, lh_star.item()

    def implicit_solve(
        self, task: ConfigTask, phi_star: list[Tensor], *, inplace: bool
    ) -> ConfigResult:
        """g_C = direct + pullback((I + gamma H)^-1 b), b = `outer_gradient` at theta* and H the
        fine-tuning loss's Hessian there, by the guarded solver (`cfg.guard`); `inplace`: the fd
        HVPs perturb phi_star itself. b is computed here so that nothing else holds it: on the
        lean path it moves to host memory."""
        cfg, c = self.cfg, task.config
        b, lh_star = self.outer_gradient(task, phi_star)
        batch = ft_batch(c, self.data["ft"], self.data["preserve"], self.alphas, task.gen)
        terms = ft_terms(task.problem.space, c, batch)
        loss = terms if cfg.split_terms else (lambda phi: sum_terms(terms, phi))
        second = cfg.hvp != "fd"
        # The attention mode must hold through the backward passes too: checkpointed blocks are
        # recomputed there and must run the same attention as in their forward.
        with pass_attention(cfg.attention, second):
            point = phi_star if inplace else [p.detach() for p in phi_star]
            hvp_at = make_hvp(loss, point, backend=cfg.hvp, inplace=inplace)

        def hvp(v: list[Tensor]) -> list[Tensor]:
            with pass_attention(cfg.attention, second):
                return hvp_at(v)

        direct, pullback = list(task.direct.grads), task.problem.pullback
        if cfg.guard == "stable" and cfg.solver == "richardson":
            # keyed by configuration slot, so the history does not depend on how ranks split the
            # slots
            key = f"{task.slot}:{c.algorithm}"
            warm = self.warm_vectors.get(key)
            device = None
            if inplace:  # every full-size vector on the device counts: b and u wait in host memory
                device, b = phi_star[0].device, host_backup(b)
            elif warm is not None:
                warm = [x.to(p.device, non_blocking=True) for x, p in zip(warm, b)]
            g, info, u = stable_hypergrad(
                direct,
                b,
                hvp,
                gamma=cfg.gamma,
                iters=cfg.iters,
                power_iters=cfg.power_iters,
                warm=warm,
                pullback=pullback,
                device=device,
            )
            # host copy between outer steps; a traced (meta) run has no data to copy
            self.warm_vectors[key] = [x.detach() if x.is_meta else x.detach().to("cpu") for x in u]
        else:
            g, info = guarded_hypergrad(
                direct,
                b,
                hvp,
                alpha=cfg.alpha,
                gamma=cfg.gamma,
                iters=cfg.iters,
                max_grad_norm=cfg.max_grad_norm,
                max_retries=cfg.max_retries,
                solver=cfg.solver,
                pullback=pullback,
            )
        return ConfigResult(g, lh_star, info.retries, bool(info.fallback), info.hvps)

    # --- one outer step -------------------------------------------------------------------------
    def step(self, s: int) -> StepResult:
        """Outer step s: a pure function of (theta, optimizer state, seed, s), so a resumed run
        repeats it.

        Batches of L_h and R come from a generator seeded by (seed, s); configuration i draws from
        `config_generator(seed, s, i)`. With a process group, the configurations are spread over
        ranks and their hypergradients summed in configuration order (distributed.py).

        NaN policy: a non-finite L_h, R, hypergradient or simulated theta* is logged with the step
        and the configurations; then the step is skipped (theta and the optimizer unchanged) or,
        with nan_policy = "abort", NumericalError is raised. A non-finite theta after an update
        always raises: nothing non-finite is ever checkpointed or exported.
        """
        cfg = self.cfg
        t0 = time.time()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        gen = step_generator(cfg.seed, s)
        with self.phase("direct gradient"):
            direct = self.direct_grad(s, gen)
        res = StepResult(step=s, harmful=direct.harmful, preserve=direct.preserve, w_r=direct.w_r)
        configs = self.ft_space.sample(cfg.configs_per_step, gen)
        res.configs = [c.short() for c in configs]
        if not direct.finite():
            # the same on every rank (no collective is skipped by one rank only)
            self._fault(
                res,
                f"outer step {s}: non-finite L_h {res.harmful}, R {res.preserve} or direct "
                f"gradient "
                f"at theta (configs {res.configs})",
            )
            res.seconds = time.time() - t0
            return res
        local, stats = {}, {}
        for i in self.dist.indices(len(configs)):
            r = self.config_hypergrad(configs[i], direct, config_generator(cfg.seed, s, i), slot=i)
            local[i], stats[i] = r.grad, dataclasses.replace(r, grad=[])
        for part in self.dist.gather_objects(stats):
            stats.update(part)
        results = [stats[i] for i in range(len(configs))]
        res.recovered = [None if r.lh_star is None else r.lh_star - res.harmful for r in results]
        res.retries = sum(r.retries for r in results)
        res.fallbacks = sum(int(r.fallback) for r in results)
        res.hvps = sum(r.hvps for r in results)
        faults = [
            f"config {i} ({res.configs[i]}): {r.fault}" for i, r in enumerate(results) if r.fault
        ]
        total = self.dist.reduce_config_grads(local, len(configs), self.theta)
        g = [x / cfg.configs_per_step for x in total]
        res.direct_norm = norm(direct.grads)
        res.hypergrad_norm = norm(g)
        if faults or not math.isfinite(res.hypergrad_norm):
            msg = (
                f"outer step {s}: non-finite value (harmful {res.harmful}, preserve "
                f"{res.preserve}, "
                f"||g|| {res.hypergrad_norm}; configs "
                f"{res.configs}{'; ' + '; '.join(faults) if faults else ''})"
            )
            self._fault(res, msg)
        else:
            self._update(s, g, res.configs)
        res.seconds = time.time() - t0
        res.peak_memory_bytes = (
            torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
        )
        return res

    def _update(self, s: int, g: list[Tensor], configs: list[str]) -> None:
        """AdamW step of theta along g; a non-finite theta afterwards raises NumericalError."""
        for p, x in zip(self.theta, g):
            p.grad = x.to(p.dtype)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if not all(torch.isfinite(p).all() for p in self.theta):
            raise NumericalError(
                f"outer step {s}: theta became non-finite after the update (configs {configs})"
            )

    def _fault(self, res: StepResult, msg: str) -> None:
        """A non-finite value in outer step res.step: raise (nan_policy abort) or log and mark it
        skipped."""
        if self.cfg.nan_policy == "abort":
            raise NumericalError(msg)
        log.error("%s: step skipped, theta unchanged", msg)
        res.skipped = True
