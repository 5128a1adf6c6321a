"""Losses of the method, as functions of UNet predictions on fixed noisy batches (a leaf module).

A `NoisyBatch` fixes images, timesteps and noise, so that every loss is a deterministic function of
the parameters: required for Hessian-vector products and finite differences.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class NoisyBatch:
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise.

    Attributes:
        x_t: (B, C, H, W) noisy inputs. t: (B,) timesteps. emb: (B, L, D) text embeddings.
        noise: (B, C, H, W) the added noise (the denoising target).
        target: optional (B, C, H, W) alternative target (ESD, distillation), computed once.
    """

    x_t: torch.Tensor
    t: torch.Tensor
    emb: torch.Tensor
    noise: torch.Tensor
    target: torch.Tensor | None = None


def make_noisy_batch(
    x0: torch.Tensor, emb: torch.Tensor, alphas_cumprod: torch.Tensor, generator: torch.Generator
) -> NoisyBatch:
    """Draw t ~ U{0..T-1} and Gaussian noise (on the CPU generator, then moved to x0's device)."""
    b = x0.shape[0]
    t = torch.randint(0, len(alphas_cumprod), (b,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
    ab = alphas_cumprod[t].to(x0.device, x0.dtype).view(-1, 1, 1, 1)
    return NoisyBatch(ab.sqrt() * x0 + (1 - ab).sqrt() * noise, t.to(x0.device), emb, noise)


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error written out: F.mse_loss breaks forward-over-reverse AD
    (pytorch#123996)."""
    return (a - b).square().mean()


def denoising_loss(eps: torch.Tensor, batch: NoisyBatch) -> torch.Tensor:
    """Standard diffusion loss ||eps_pred - noise||^2 (mean)."""
    return mse(eps, batch.noise)


def dreambooth_loss(
    instance: torch.Tensor | None, prior: torch.Tensor | None, prior_weight: float
) -> torch.Tensor:
    """DreamBooth's loss with prior preservation: instance + prior_weight x prior (0-d tensors).

    prior None: the instance loss alone (the standard loss). instance None: the weighted prior term
    alone, for a loss differentiated term by term (`inner.simulate.ft_terms`).
    """
    if prior is None:
        return instance
    return prior_weight * prior if instance is None else instance + prior_weight * prior


def ga_loss(eps: torch.Tensor, batch: NoisyBatch) -> torch.Tensor:
    """Gradient-ascent harmful loss: minus the denoising loss on harmful pairs."""
    return -mse(eps, batch.noise)


@torch.no_grad()
def esd_target(
    eps0: EpsFn,
    batch: NoisyBatch,
    uncond_emb: torch.Tensor,
    eta: float,
    from_emb: torch.Tensor | None = None,
) -> torch.Tensor:
    """ESD negative-guidance target eps0(x_t, c_from) - eta (eps0(x_t, c) - eps0(x_t, "")).

    Args:
        eps0: the frozen original model's prediction eps0(x_t, t, emb).
        uncond_emb: (1, L, D) embedding of the empty prompt.
        from_emb: (B or 1, L, D) embedding of c_from; None means the empty prompt.
    """
    u = uncond_emb.expand_as(batch.emb)
    e_u = eps0(batch.x_t, batch.t, u)
    e_c = eps0(batch.x_t, batch.t, batch.emb)
    e_from = e_u if from_emb is None else eps0(batch.x_t, batch.t, from_emb.expand_as(batch.emb))
    return e_from - eta * (e_c - e_u)


@torch.no_grad()
def guidance_target(
    eps0: EpsFn, batch: NoisyBatch, uncond_emb: torch.Tensor, eta: float
) -> torch.Tensor:
    """The ESD target written on the guidance direction: -eta (eps0(x_t, c) - eps0(x_t, "")), what
    the unlearned model's eps(x_t, c) - eps(x_t, "") should be (see `guidance_loss`)."""
    u = uncond_emb.expand_as(batch.emb)
    return -eta * (eps0(batch.x_t, batch.t, batch.emb) - eps0(batch.x_t, batch.t, u))


def guidance_loss(eps: torch.Tensor, eps_uncond: torch.Tensor, batch: NoisyBatch) -> torch.Tensor:
    """||(eps(x_t, c) - sg[eps(x_t, "")]) - batch.target||^2 with batch.target from
    `guidance_target`.

    ESD's loss ||eps(x_t, c) - eps_ESD||^2 also grows with any change of the model's predictions
    that the conditional and unconditional branches share (fine-tuning drift), which is 20-30x the
    concept's own recovery after simulated fine-tuning on the digits world
    (RESILIENCE_DIAGNOSIS.md). On the guidance direction that common change cancels, so the value
    measures the concept alone. The unconditional branch enters without gradient (`eps_uncond`
    detached): the loss moves only the concept's conditional prediction, never the unconditional
    model.
    """
    if batch.target is None:
        raise ValueError("batch has no target: compute it with guidance_target first")
    return mse(eps - eps_uncond.detach(), batch.target)


def target_loss(eps: torch.Tensor, batch: NoisyBatch) -> torch.Tensor:
    """||eps_pred - batch.target||^2: the ESD harmful loss and the preservation distillation."""
    if batch.target is None:
        raise ValueError("batch has no target: compute it with the frozen original model first")
    return mse(eps, batch.target)


def sigmoid_ramp(step: int, total: int, start: float, end: float, sharpness: float = 10.0) -> float:
    """start for the first half of training, then a sigmoid ramp to `end` over the second half."""
    if total <= 1:
        return end
    p = (step / (total - 1) - 0.5) * 2  # -1 .. 1; the ramp lives on 0 .. 1
    if p <= 0:
        return start
    s = torch.sigmoid(torch.tensor(sharpness * (p - 0.5))).item()
    return start + (end - start) * s
