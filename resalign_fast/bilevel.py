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

import torch

from resalign_fast.config import ResAlignConfig
from resalign_fast.data.encoded import EncodedSet
from resalign_fast.hypergrad import guarded_hypergrad, make_hvp, unrolled_hypergrad
from resalign_fast.inner.configs import FTSpace
from resalign_fast.inner.simulate import ft_batch, ft_loss, inner_problem, optim_spec, simulate_finetune
from resalign_fast.models.lora import ParamSpace, add_lora, adapters_disabled, base_names, lora_names
from resalign_fast.objectives import NoisyBatch, esd_target, ga_loss, make_noisy_batch, sigmoid_ramp, target_loss

log = logging.getLogger("resalign_fast.bilevel")


class NumericalError(RuntimeError):
    """A NaN or inf in a loss or hypergradient (the message names the step and configuration)."""


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
    """

    def __init__(self, cfg: ResAlignConfig, model, data: dict[str, EncodedSet], ft_space: FTSpace,
                 uncond_emb: torch.Tensor) -> None:
        self.cfg, self.model, self.data, self.ft_space = cfg, model, data, ft_space
        self.uncond = uncond_emb
        unet = model.unet
        self._setup_attention(unet)
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if cfg.theta == "lora":
            add_lora(unet, cfg.lora_rank, cfg.lora_alpha, cfg.lora_init, cfg.lora_placement)
            self.space = ParamSpace(unet, lora_names(unet), adapters=True)
            self._orig = None
        else:
            unet.requires_grad_(False)
            self.space = ParamSpace(unet, base_names(unet), adapters=True)
            self._orig = [p.detach().clone() for p in self.space.values()]  # full theta needs a frozen copy
        self.theta = self.space.values()
        for p in self.theta:
            p.requires_grad_(True)
        self.opt = torch.optim.AdamW(self.theta, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.alphas = model.scheduler.alphas_cumprod.float().to(self.theta[0].device)

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
            return self.space.eps(self._orig, x, t, emb)

    # --- objectives ----------------------------------------------------------------------------
    def harmful_batch(self, gen: torch.Generator) -> NoisyBatch:
        b = make_noisy_batch(*self.data["harmful"].sample(self.cfg.batch_size, gen), self.alphas, gen)
        if self.cfg.harmful_loss == "esd":
            b.target = esd_target(self.eps0, b, self.uncond, self.cfg.esd_eta)
        return b

    def preserve_batch(self, gen: torch.Generator) -> NoisyBatch:
        b = make_noisy_batch(*self.data["preserve"].sample(self.cfg.batch_size, gen), self.alphas, gen)
        b.target = self.eps0(b.x_t, b.t, b.emb)
        return b

    def harmful_loss(self, space: ParamSpace, params: list[torch.Tensor], b: NoisyBatch) -> torch.Tensor:
        eps = space.eps(params, b.x_t, b.t, b.emb)
        return ga_loss(eps, b) if self.cfg.harmful_loss == "ga" else target_loss(eps, b)

    # --- one outer step -------------------------------------------------------------------------
    def step(self, s: int) -> StepResult:
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
        total = [torch.zeros_like(p) for p in self.theta]
        for c in self.ft_space.sample(cfg.configs_per_step, gen):
            g, info = self._config_hypergrad(c, theta, direct, hb, gen, res)
            res.configs.append(c.short())
            res.retries += info.retries if info else 0
            res.fallbacks += int(info.fallback) if info else 0
            for acc, x in zip(total, g):
                acc.add_(x)
        g = [x / cfg.configs_per_step for x in total]
        res.direct_norm = math.sqrt(sum(float(d.pow(2).sum()) for d in direct))
        res.hypergrad_norm = math.sqrt(sum(float(x.pow(2).sum()) for x in g))
        if not (math.isfinite(res.hypergrad_norm) and math.isfinite(res.harmful) and math.isfinite(res.preserve)):
            msg = f"outer step {s}: non-finite value (harmful {res.harmful}, preserve {res.preserve}, ||g|| {res.hypergrad_norm}; configs {res.configs})"
            if cfg.nan_policy == "abort":
                raise NumericalError(msg)
            log.error("%s: step skipped, theta unchanged", msg)
            res.skipped = True
        else:
            for p, x in zip(self.theta, g):
                p.grad = x.to(p.dtype)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        res.seconds = time.time() - t0
        res.peak_memory_bytes = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
        return res

    def _config_hypergrad(self, c, theta, direct, hb, gen, res):
        """Hypergradient of one sampled configuration C: returns (g_C, GuardInfo or None)."""
        cfg = self.cfg
        prob = inner_problem(self.space, cfg.theta, c.algorithm, theta)
        phi0 = [p.detach() for p in prob.phi0(theta)]
        prior = self.data["preserve"]
        prox = cfg.gamma if cfg.proximal else None
        with _attention_ctx(cfg, False):
            if cfg.hypergrad == "unrolled":
                return self._unrolled(c, prob, theta, direct, hb, gen, res), None
            phi_star = simulate_finetune(prob.space, phi0, c, self.data["ft"], prior, self.alphas, gen, proximal_gamma=prox)
            ps = [p.requires_grad_(True) for p in phi_star]
            lh_star = self.harmful_loss(prob.space, ps, hb)
            b = [cfg.lam * x for x in torch.autograd.grad(lh_star, ps)]
        res.recovered.append(lh_star.item() - res.harmful)
        if cfg.hypergrad == "first_order":
            v = prob.pullback(b)
            return [d + x for d, x in zip(direct, v)], None
        batch = ft_batch(c, self.data["ft"], prior, self.alphas, gen)
        second = cfg.hvp != "fd"

        def loss_fn(phi):
            with _attention_ctx(cfg, second):
                return ft_loss(prob.space, phi, c, batch)

        hvp = make_hvp(loss_fn, [p.detach() for p in phi_star], backend=cfg.hvp)
        return guarded_hypergrad(list(direct), b, hvp, alpha=cfg.alpha, gamma=cfg.gamma, iters=cfg.iters,
                                 max_grad_norm=cfg.max_grad_norm, max_retries=cfg.max_retries,
                                 solver=cfg.solver, pullback=prob.pullback)

    def _unrolled(self, c, prob, theta, direct, hb, gen, res):
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
