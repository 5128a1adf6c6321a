"""Simulated downstream fine-tuning: which parameters a configuration trains, its loss, the run
itself.

For a configuration C the *inner space* is what the simulated user trains:
- theta = LoRA, C = LoRA: theta's own adapter (phi0 = theta, the identity map);
- theta = LoRA, C = full: every UNet weight with theta merged in (phi0 = merge(theta),
  differentiable);
- theta = full, C = full: the identity;
- theta = full, C = LoRA: the attention projections LoRA would adapt (phi0 = that subset of theta;
  the cross-term through the frozen rest is neglected: an approximation, logged once).
`InnerProblem.pullback` maps a vector of the inner space back to theta's space (the transpose of
d phi0 / d theta), which is how the implicit hypergradient reaches theta.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from resalign_fast.data.encoded import EncodedSet
from resalign_fast.hypergrad.hvp import term_grads
from resalign_fast.inner.configs import FTConfig
from resalign_fast.inner.optim import OptimSpec, OptState, init_state, step_
from resalign_fast.models.lora import TARGETS, ParamSpace, base_names, merge_map
from resalign_fast.objectives import NoisyBatch, denoising_loss, dreambooth_loss, make_noisy_batch

log = logging.getLogger("resalign_fast.inner")
_warned_subset = False


@dataclass
class InnerProblem:
    """One configuration's inner space and maps. space: where phi lives; phi0: theta -> phi0;
    pullback: inner-space vector -> theta-space vector."""

    space: ParamSpace
    phi0: Callable[[list[torch.Tensor]], list[torch.Tensor]]
    pullback: Callable[[list[torch.Tensor]], list[torch.Tensor]]


def inner_problem(
    theta_space: ParamSpace, theta_kind: str, algorithm: str, theta: list[torch.Tensor]
) -> InnerProblem:
    """The inner space of configuration `algorithm` ("full" or "lora") for theta of kind
    `theta_kind`."""
    global _warned_subset
    unet = theta_space.unet
    identity = InnerProblem(theta_space, lambda th: list(th), lambda v: list(v))
    if theta_kind == "lora" and algorithm == "lora":
        return identity
    if theta_kind == "full" and algorithm == "full":
        return identity
    if theta_kind == "lora":  # full fine-tuning of the merged model
        names = base_names(unet)
        space = ParamSpace(unet, names, adapters=False)
        phi0 = merge_map(unet, theta_space, names)

        def pullback(v: list[torch.Tensor]) -> list[torch.Tensor]:
            th = [t.detach().requires_grad_(True) for t in theta]
            out = phi0(th)
            pairs = [(o, x) for o, x in zip(out, v) if o.requires_grad]
            gs = torch.autograd.grad(
                [o for o, _ in pairs], th, [x for _, x in pairs], allow_unused=True
            )
            return [torch.zeros_like(t) if g is None else g for g, t in zip(gs, th)]

        return InnerProblem(space, phi0, pullback)
    # theta full, configuration LoRA: the attention projections as a subset of theta
    if not _warned_subset:
        log.warning(
            "full theta with LoRA fine-tuning configs: simulating on the attention projections, "
            "neglecting the cross-term through the other weights"
        )
        _warned_subset = True
    idx = [
        i
        for i, n in enumerate(theta_space.names)
        if any(f".{t}." in n or n.endswith(f".{t}.weight") for t in TARGETS) and ".attn" in n
    ]
    space = ParamSpace(unet, [theta_space.names[i] for i in idx], adapters=theta_space.adapters)

    def scatter(v: list[torch.Tensor]) -> list[torch.Tensor]:
        out = [torch.zeros_like(t) for t in theta]
        for i, x in zip(idx, v):
            out[i] = x
        return out

    return InnerProblem(space, lambda th: [th[i] for i in idx], scatter)


def optim_spec(cfg: FTConfig) -> OptimSpec:
    """The simulated optimizer of configuration `cfg` (torch.optim defaults otherwise)."""
    return OptimSpec(
        name=cfg.optimizer,
        lr=cfg.lr,
        momentum=cfg.momentum if cfg.optimizer == "sgd" else 0.0,
        weight_decay=cfg.weight_decay if cfg.optimizer != "adamw" else None,
    )


def ft_batch(
    cfg: FTConfig, ft: EncodedSet, prior: EncodedSet, alphas: torch.Tensor, gen: torch.Generator
) -> tuple[NoisyBatch, NoisyBatch | None]:
    """A fine-tuning batch of `cfg` (plus the class batch of DreamBooth configurations)."""
    inst = make_noisy_batch(*ft.sample(cfg.batch_size, gen), alphas, gen)
    pri = (
        make_noisy_batch(*prior.sample(cfg.batch_size, gen), alphas, gen)
        if cfg.loss == "dreambooth"
        else None
    )
    return inst, pri


def ft_terms(
    space: ParamSpace, cfg: FTConfig, batch: tuple[NoisyBatch, NoisyBatch | None]
) -> list[Callable[[list[torch.Tensor]], torch.Tensor]]:
    """The fine-tuning loss of `cfg` on a fixed batch as a sum of terms, each ``term(phi) -> loss``:
    the denoising loss, plus for DreamBooth its weighted prior (class) term (`dreambooth_loss`
    taken term by term; one forward each)."""
    inst, pri = batch
    terms = [lambda phi: denoising_loss(space.eps(phi, inst.x_t, inst.t, inst.emb), inst)]
    if pri is not None:
        terms.append(
            lambda phi: dreambooth_loss(
                None, denoising_loss(space.eps(phi, pri.x_t, pri.t, pri.emb), pri), cfg.prior_weight
            )
        )
    return terms


def ft_loss(
    space: ParamSpace,
    phi: list[torch.Tensor],
    cfg: FTConfig,
    batch: tuple[NoisyBatch, NoisyBatch | None],
) -> torch.Tensor:
    """The fine-tuning loss of `cfg` at phi on a fixed batch (two forward passes for DreamBooth)."""
    return sum_terms(ft_terms(space, cfg, batch), phi)


def sum_terms(
    terms: list[Callable[[list[torch.Tensor]], torch.Tensor]], phi: list[torch.Tensor]
) -> torch.Tensor:
    """terms[0](phi) + terms[1](phi) + ... (every term's graph alive at once)."""
    loss = terms[0](phi)
    for term in terms[1:]:
        loss = loss + term(phi)
    return loss


def simulate_finetune(
    space: ParamSpace,
    phi0: list[torch.Tensor],
    cfg: FTConfig,
    ft: EncodedSet,
    prior: EncodedSet,
    alphas: torch.Tensor,
    gen: torch.Generator,
    *,
    proximal_gamma: float | None = None,
    split_terms: bool = False,
    start: list[torch.Tensor] | None = None,
    state: OptState | None = None,
) -> list[torch.Tensor]:
    """Run `cfg.steps` optimizer steps from phi0 without keeping any graph; returns theta*
    (detached).

    Args:
        proximal_gamma: if given, minimise L_FT(phi) + ||phi - phi0||^2 / (2 gamma) instead (the
            proximal variant; the reference code simulates plain steps, the default).
        split_terms: differentiate DreamBooth's two loss terms one at a time
            (`hypergrad.hvp.term_grads`).
        start, state: continue an earlier simulation: start from `start` (phi0 stays the proximal
            anchor) with optimizer state `state`, which is updated in place (ft_carry). Default: a
            fresh run from phi0.
    """
    phi = [p.detach().clone().requires_grad_(True) for p in (phi0 if start is None else start)]
    anchor = [p.detach() for p in phi0]
    spec = optim_spec(cfg)
    state = init_state(spec, phi) if state is None else state
    for _ in range(cfg.steps):
        batch = ft_batch(cfg, ft, prior, alphas, gen)
        grads = term_grads(ft_terms(space, cfg, batch), phi, split_terms)
        if proximal_gamma is not None:
            grads = [g + (p.detach() - a) / proximal_gamma for g, p, a in zip(grads, phi, anchor)]
        step_(spec, phi, grads, state)
    return [p.detach() for p in phi]
