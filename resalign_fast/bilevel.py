"""One ResAlign outer step (METHOD.md, Algorithm 2): sample configs -> simulate -> objectives ->
hypergradient -> AdamW update of theta.

    g = (1 - lambda) grad L_h(theta) + w_r grad R(theta) + mean_i pullback_i( (I + gamma H_i)^-1 lambda grad L_h(theta*_i) )
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from resalign_fast.config import ResAlignConfig
from resalign_fast.data.encoded import EncodedSet
from resalign_fast.distributed import DistContext
from resalign_fast.hypergrad import guarded_hypergrad, make_hvp, unrolled_hypergrad
from resalign_fast.hypergrad.stable import stable_hypergrad
from resalign_fast.inner.configs import FTSpace
from resalign_fast.inner.inplace import host_backup, restore, simulate_inplace
from resalign_fast.inner.simulate import (ft_batch, ft_loss, ft_terms, inner_problem, optim_spec, simulate_finetune,
                                          sum_terms)
from resalign_fast.models.checkpointing import enable_checkpointing
from resalign_fast.models.lora import ParamSpace, add_lora, adapters_disabled, base_names, lora_names
from resalign_fast.objectives import (NoisyBatch, esd_target, ga_loss, guidance_loss, guidance_target, make_noisy_batch,
                                     sigmoid_ramp, target_loss)

log = logging.getLogger("resalign_fast.bilevel")


class NumericalError(RuntimeError):
    """A NaN or inf in a loss or hypergradient (the message names the step and configuration)."""


class _SimulationFault(ArithmeticError):
    """One configuration's simulated fine-tuning went non-finite (handled per nan_policy by `step`)."""


def config_generator(seed: int, step: int, i: int) -> torch.Generator:
    """The generator of configuration i of outer step `step`: its batches do not depend on the other
    configurations, so any rank can compute it (distributed.py). i < 2**20."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) << 20) + i)


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


def _attention_ctx(cfg: ResAlignConfig, second_order: bool):
    """Attention mode for a pass: chunked (twice differentiable, O(N chunk)) for second-order passes."""
    try:
        from resalign_fast.models.attention import attention_mode
    except ImportError:
        return contextlib.nullcontext()
    if cfg.attention == "math":
        return attention_mode("math")
    return attention_mode("chunked" if second_order else "fused")


class ResAlign:
    """Holds theta, its optimizer and the encoded data; `step(s)` runs outer step s.

    Args:
        cfg: the run configuration.
        model: a `DiffusionModel` (its UNet gets theta's adapter when cfg.theta == "lora").
        data: {"harmful", "preserve", "ft"} -> EncodedSet (D_preserve doubles as DreamBooth class data).
        ft_space: pi(C).
        uncond_emb: (1, L, D) empty-prompt embedding (ESD).
        dist: the process group over which the k configurations are spread (None: one process).
    """

    def __init__(self, cfg: ResAlignConfig, model, data: dict[str, EncodedSet], ft_space: FTSpace,
                 uncond_emb: torch.Tensor, dist: Optional[DistContext] = None) -> None:
        self.cfg, self.model, self.data, self.ft_space = cfg, model, data, ft_space
        self.dist = dist or DistContext()
        self.uncond = uncond_emb
        unet = model.unet
        self._setup_attention(unet)
        if cfg.gradient_checkpointing:
            enable_checkpointing(unet)
        if cfg.theta == "lora":
            add_lora(unet, cfg.lora_rank, cfg.lora_alpha, cfg.lora_init, cfg.lora_placement)
            self.space = ParamSpace(unet, lora_names(unet), adapters=True)
            self._orig = None
        else:
            unet.requires_grad_(False)
            self.space = ParamSpace(unet, base_names(unet), adapters=True)
            # full theta needs a frozen copy of the original UNet, held in the frozen dtype (bf16/fp16 on GPU)
            self._frozen_dtype = getattr(model, "frozen_dtype", torch.float32)
            self._orig = [p.detach().to(self._frozen_dtype, copy=True) for p in self.space.values()]
        self.theta = self.space.values()
        for p in self.theta:
            p.requires_grad_(True)
        self.opt = torch.optim.AdamW(self.theta, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.alphas = model.scheduler.alphas_cumprod.float().to(self.theta[0].device)
        # stable guard: the last top-curvature eigenvector per configuration slot and inner space (host
        # memory; checkpointed by rank 0, so a distributed resume restarts the other ranks' slots cold)
        self.warm_vectors: dict[str, list[torch.Tensor]] = {}
        # ft_carry: per configuration slot, the simulation to continue (checkpointed like warm_vectors)
        self.carry: dict[str, dict] = {}

    def _setup_attention(self, unet) -> None:
        try:
            from resalign_fast.models.attention import set_lean_attention
        except ImportError:
            set_lean_attention = None
        if self.cfg.attention in ("auto", "lean") and set_lean_attention is not None:
            set_lean_attention(unet)
        elif self.cfg.attention == "lean":
            raise RuntimeError("attention='lean' requested but resalign_fast.models.attention is unavailable")
        else:
            from diffusers.models.attention_processor import AttnProcessor
            unet.set_attn_processor(AttnProcessor())  # math attention: twice differentiable (FACTS.md)

    # --- the frozen original model -------------------------------------------------------------
    @torch.no_grad()
    def eps0(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The original model's prediction (adapter disabled; no second copy for LoRA theta)."""
        with _attention_ctx(self.cfg, False):
            if self._orig is None:
                with adapters_disabled(self.space.unet):
                    return self.space.unet(x, t, emb).sample
            d = self._frozen_dtype
            return self.space.eps(self._orig, x.to(d), t, emb.to(d)).to(x.dtype)

    # --- objectives ----------------------------------------------------------------------------
    def harmful_batch(self, gen: torch.Generator) -> NoisyBatch:
        b = make_noisy_batch(*self.data["harmful"].sample(self.cfg.batch_size, gen), self.alphas, gen)
        if self.cfg.harmful_loss == "esd":
            b.target = esd_target(self.eps0, b, self.uncond, self.cfg.esd_eta)
        elif self.cfg.harmful_loss == "guidance":
            b.target = guidance_target(self.eps0, b, self.uncond, self.cfg.esd_eta)
        return b

    def preserve_batch(self, gen: torch.Generator) -> NoisyBatch:
        b = make_noisy_batch(*self.data["preserve"].sample(self.cfg.batch_size, gen), self.alphas, gen)
        b.target = self.eps0(b.x_t, b.t, b.emb)
        return b

    def harmful_loss(self, space: ParamSpace, params: list[torch.Tensor], b: NoisyBatch) -> torch.Tensor:
        eps = space.eps(params, b.x_t, b.t, b.emb)
        if self.cfg.harmful_loss == "guidance":
            with torch.no_grad():
                eps_u = space.eps([p.detach() for p in params], b.x_t, b.t, self.uncond.expand_as(b.emb))
            return guidance_loss(eps, eps_u, b)
        return ga_loss(eps, b) if self.cfg.harmful_loss == "ga" else target_loss(eps, b)

    # --- one outer step -------------------------------------------------------------------------
    def step(self, s: int) -> StepResult:
        """Outer step s: a pure function of (theta, optimizer state, seed, s), so a resumed run repeats it.

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
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + s)
        w_r = sigmoid_ramp(s, cfg.outer_steps, cfg.w_r_start, cfg.w_r_end)
        hb, pb = self.harmful_batch(gen), self.preserve_batch(gen)
        theta = [p.detach().requires_grad_(True) for p in self.theta]
        with _attention_ctx(cfg, False):
            lh = self.harmful_loss(self.space, theta, hb)
            r = target_loss(self.space.eps(theta, pb.x_t, pb.t, pb.emb), pb)
            direct = torch.autograd.grad((1 - cfg.lam) * lh + w_r * r, theta)
        res = StepResult(step=s, harmful=lh.item(), preserve=r.item(), w_r=w_r)
        configs = self.ft_space.sample(cfg.configs_per_step, gen)
        res.configs = [c.short() for c in configs]
        if not (math.isfinite(res.harmful) and math.isfinite(res.preserve) and all(torch.isfinite(d).all() for d in direct)):
            # the same on every rank (no collective is skipped by one rank only)
            self._fault(res, f"outer step {s}: non-finite L_h {res.harmful}, R {res.preserve} or direct gradient "
                             f"at theta (configs {res.configs})")
            res.seconds = time.time() - t0
            return res
        local, stats = {}, {}
        for i in self.dist.indices(len(configs)):
            st = stats[i] = {"lh_star": None, "retries": 0, "fallback": False, "hvps": 0, "fault": "", "slot": i}
            try:
                if cfg.lam == 0:  # plain unlearning: the resilience term is 0, nothing to simulate
                    g, info = [d.detach().clone() for d in direct], None
                else:
                    g, info = self._config_hypergrad(configs[i], theta, direct, hb, config_generator(cfg.seed, s, i), st)
            except _SimulationFault as e:
                st["fault"], g, info = str(e), [torch.full_like(p, float("nan")) for p in self.theta], None
            st["retries"], st["fallback"], st["hvps"] = (info.retries, bool(info.fallback), info.hvps) if info else (0, False, 0)
            local[i] = g
        for part in self.dist.gather_objects(stats):
            stats.update(part)
        res.recovered = [None if stats[i]["lh_star"] is None else stats[i]["lh_star"] - res.harmful
                         for i in range(len(configs))]
        res.retries = sum(stats[i]["retries"] for i in range(len(configs)))
        res.fallbacks = sum(int(stats[i]["fallback"]) for i in range(len(configs)))
        res.hvps = sum(stats[i]["hvps"] for i in range(len(configs)))
        faults = [f"config {i} ({res.configs[i]}): {stats[i]['fault']}" for i in range(len(configs)) if stats[i]["fault"]]
        total = self.dist.reduce_config_grads(local, len(configs), self.theta)
        g = [x / cfg.configs_per_step for x in total]
        res.direct_norm = math.sqrt(sum(float(d.pow(2).sum()) for d in direct))
        res.hypergrad_norm = math.sqrt(sum(float(x.pow(2).sum()) for x in g))
        if faults or not (math.isfinite(res.hypergrad_norm) and math.isfinite(res.harmful) and math.isfinite(res.preserve)):
            msg = (f"outer step {s}: non-finite value (harmful {res.harmful}, preserve {res.preserve}, "
                   f"||g|| {res.hypergrad_norm}; configs {res.configs}{'; ' + '; '.join(faults) if faults else ''})")
            self._fault(res, msg)
        else:
            for p, x in zip(self.theta, g):
                p.grad = x.to(p.dtype)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            if not all(torch.isfinite(p).all() for p in self.theta):
                raise NumericalError(f"outer step {s}: theta became non-finite after the update (configs {res.configs})")
        res.seconds = time.time() - t0
        res.peak_memory_bytes = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
        return res

    def _fault(self, res: StepResult, msg: str) -> None:
        """A non-finite value in outer step res.step: raise (nan_policy abort) or log and mark it skipped."""
        if self.cfg.nan_policy == "abort":
            raise NumericalError(msg)
        log.error("%s: step skipped, theta unchanged", msg)
        res.skipped = True

    def _config_hypergrad(self, c, theta, direct, hb, gen, st):
        """Hypergradient of one sampled configuration C: returns (g_C, GuardInfo or None).

        Writes the recovered harm into st["recovered"]; raises _SimulationFault when the simulated
        fine-tuning ends in a non-finite theta* or L_h(theta*) (the guard would otherwise hide it).
        """
        cfg = self.cfg
        st.setdefault("slot", 0)  # the configuration slot (callers outside step() may leave it out)
        prob = inner_problem(self.space, cfg.theta, c.algorithm, theta)
        if cfg.hypergrad == "unrolled":
            with _attention_ctx(cfg, False):
                return self._unrolled(c, prob, theta, direct, hb, gen), None
        if cfg.lean_full and c.algorithm == "full":
            return self._lean_full(c, prob, theta, direct, hb, gen, st)
        phi0 = [p.detach() for p in prob.phi0(theta)]
        prox = cfg.gamma if cfg.proximal else None
        slot = str(st["slot"])
        start, state = self._carried(slot, c, phi0)
        with _attention_ctx(cfg, False):
            phi_star = simulate_finetune(prob.space, phi0, c, self.data["ft"], self.data["preserve"], self.alphas,
                                         gen, proximal_gamma=prox, split_terms=cfg.split_terms, start=start,
                                         state=state)
        if cfg.ft_carry and not all(torch.isfinite(p).all() for p in phi_star):
            self.carry.pop(slot, None)  # restart next time; _from_star reports the fault
        elif cfg.ft_carry:
            done = (self.carry.get(slot, {}).get("steps", 0) if start is not None else 0) + c.steps
            self.carry[slot] = {"config": c.short(), "steps": done, "opt_step": state.step,
                                           "delta": [(a - b).cpu() for a, b in zip(phi_star, phi0)],
                                           "buffers": {k: [x.cpu() for x in v] for k, v in state.buffers.items()}}
        return self._from_star(c, prob, [p.requires_grad_(True) for p in phi_star], direct, hb, gen, st, False)

    def _carried(self, slot: str, c, phi0: list[torch.Tensor]):
        """ft_carry: (start, optimizer state) continuing the slot's last simulation when it ran the same
        configuration and c.steps more stay within cfg.ft_carry accumulated steps; else a fresh
        start (None, a new state). The carried displacement is added to today's phi0 (theta moved)."""
        from resalign_fast.inner.optim import OptState, init_state

        prev = self.carry.get(slot)
        if not self.cfg.ft_carry or prev is None or prev["config"] != c.short() \
                or prev["steps"] + c.steps > self.cfg.ft_carry:
            return None, init_state(optim_spec(c), phi0)
        dev = phi0[0].device
        start = [p + d.to(dev) for p, d in zip(phi0, prev["delta"])]
        return start, OptState(prev["opt_step"], {k: [x.to(dev) for x in v] for k, v in prev["buffers"].items()})

    def _lean_full(self, c, prob, theta, direct, hb, gen, st):
        """A full-parameter configuration in place on the UNet's own weights (cfg.lean_full): the
        starting weights wait in host memory, the optimizer steps inside the backward pass
        (inner/inplace.py) and the fd HVPs perturb the weights in place (make_hvp inplace)."""
        params = prob.space.values()
        flags = [p.requires_grad for p in params]
        backup = host_backup(params)
        try:
            with torch.no_grad():
                for p, x in zip(params, prob.phi0(theta)):
                    if x.data_ptr() != p.data_ptr():  # theta LoRA: the merged weights
                        p.copy_(x)
            for p in params:
                p.requires_grad_(True)

            def loss():
                batch = ft_batch(c, self.data["ft"], self.data["preserve"], self.alphas, gen)
                return ft_loss(prob.space, params, c, batch)

            with _attention_ctx(self.cfg, False):
                simulate_inplace(params, loss, optim_spec(c), c.steps, offload=self.cfg.offload_optimizer_state)
            return self._from_star(c, prob, params, direct, hb, gen, st, True)
        finally:
            restore(params, backup)
            for p, f in zip(params, flags):
                p.requires_grad_(f)

    def _from_star(self, c, prob, phi_star, direct, hb, gen, st, inplace: bool):
        """From theta* (leaves that require grad): b = lambda grad L_h(theta*), then the first-order or
        the guarded implicit hypergradient, pulled back to theta."""
        cfg = self.cfg
        with _attention_ctx(cfg, False):
            if not all(torch.isfinite(p).all() for p in phi_star):
                raise _SimulationFault("simulated fine-tuning produced non-finite weights")
            lh_star = self.harmful_loss(prob.space, phi_star, hb)
            if not torch.isfinite(lh_star):
                raise _SimulationFault(f"L_h(theta*) = {lh_star.item()}")
            b = [cfg.lam * x for x in torch.autograd.grad(lh_star, phi_star)]
        st["lh_star"] = lh_star.item()
        if cfg.hypergrad == "first_order":
            v = prob.pullback(b)
            return [d + x for d, x in zip(direct, v)], None
        terms = ft_terms(prob.space, c, ft_batch(c, self.data["ft"], self.data["preserve"], self.alphas, gen))
        loss = terms if cfg.split_terms else (lambda phi: sum_terms(terms, phi))
        second = cfg.hvp != "fd"
        # The attention mode must hold through the backward passes too: checkpointed blocks are
        # recomputed there and must run the same attention as in their forward.
        with _attention_ctx(cfg, second):
            point = phi_star if inplace else [p.detach() for p in phi_star]
            hvp_at = make_hvp(loss, point, backend=cfg.hvp, inplace=inplace)

        def hvp(v):
            with _attention_ctx(cfg, second):
                return hvp_at(v)

        if cfg.guard == "stable" and cfg.solver == "richardson":
            # keyed by configuration slot, so the history does not depend on how ranks split the slots
            key = f"{st['slot']}:{c.algorithm}"
            warm = self.warm_vectors.get(key)
            device = None
            if inplace:  # every full-size vector on the device counts: b and u wait in host memory
                device, b = phi_star[0].device, host_backup(b)
            elif warm is not None:
                warm = [x.to(p.device, non_blocking=True) for x, p in zip(warm, b)]
            g, info, u = stable_hypergrad(list(direct), b, hvp, gamma=cfg.gamma, iters=cfg.iters,
                                          power_iters=cfg.power_iters, warm=warm, pullback=prob.pullback,
                                          device=device)
            # host copy between outer steps; a traced (meta) run has no data to copy
            self.warm_vectors[key] = [x.detach() if x.is_meta else x.detach().to("cpu") for x in u]
            return g, info
        return guarded_hypergrad(list(direct), b, hvp, alpha=cfg.alpha, gamma=cfg.gamma, iters=cfg.iters,
                                 max_grad_norm=cfg.max_grad_norm, max_retries=cfg.max_retries,
                                 solver=cfg.solver, pullback=prob.pullback)

    def _unrolled(self, c, prob, theta, direct, hb, gen):
        """Backpropagation through the simulated steps (activation memory independent of steps)."""
        cfg = self.cfg
        batches = [ft_batch(c, self.data["ft"], self.data["preserve"], self.alphas, gen) for _ in range(c.steps)]

        def outer(th, phi):
            return cfg.lam * self.harmful_loss(prob.space, phi, hb)

        def inner(phi, t):
            return ft_loss(prob.space, phi, c, batches[t])

        phi0 = [p.detach() for p in prob.phi0(theta)]
        with _attention_ctx(cfg, True):
            v = unrolled_hypergrad(phi0, outer, inner, optim_spec(c), c.steps, truncate=cfg.unroll_steps or None)
        return [d + x for d, x in zip(direct, prob.pullback(v))]
