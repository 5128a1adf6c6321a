"""The unlearning objectives of an outer step: the frozen original model's prediction, the L_h
and R batches with their targets, and L_h at any point of any parameter space.

`UnlearningObjectives` is the part of `bilevel.ResAlign` that reads its data; it expects the
attributes `ResAlign.__init__` sets (cfg, prepared, space, data, alphas, uncond).
"""

from __future__ import annotations

import torch
from torch import Tensor

from resalign_fast.models.lora import ParamSpace, adapters_disabled
from resalign_fast.models.prepare import pass_attention
from resalign_fast.objectives import (
    NoisyBatch,
    esd_target,
    ga_loss,
    guidance_loss,
    guidance_target,
    make_noisy_batch,
    target_loss,
)


class UnlearningObjectives:
    """eps0, harmful_batch, preserve_batch and harmful_loss of a `bilevel.ResAlign`."""

    # --- the frozen original model -------------------------------------------------------------
    @torch.no_grad()
    def eps0(self, x: Tensor, t: Tensor, emb: Tensor) -> Tensor:
        """The original model's prediction (adapter disabled; no second copy for LoRA theta)."""
        with pass_attention(self.cfg.attention, False):
            if self.prepared.original is None:
                with adapters_disabled(self.space.unet):
                    return self.space.unet(x, t, emb).sample
            d = self.prepared.frozen_dtype
            return self.space.eps(self.prepared.original, x.to(d), t, emb.to(d)).to(x.dtype)

    # --- objectives ----------------------------------------------------------------------------
    def harmful_batch(self, gen: torch.Generator) -> NoisyBatch:
        """A batch of D_harmful with L_h's target (ESD / guidance) from the original model."""
        b = make_noisy_batch(
            *self.data["harmful"].sample(self.cfg.batch_size, gen), self.alphas, gen
        )
        if self.cfg.harmful_loss == "esd":
            b.target = esd_target(self.eps0, b, self.uncond, self.cfg.esd_eta)
        elif self.cfg.harmful_loss == "guidance":
            b.target = guidance_target(self.eps0, b, self.uncond, self.cfg.esd_eta)
        return b

    def preserve_batch(self, gen: torch.Generator) -> NoisyBatch:
        """A batch of D_preserve with the original model's prediction as target."""
        b = make_noisy_batch(
            *self.data["preserve"].sample(self.cfg.batch_size, gen), self.alphas, gen
        )
        b.target = self.eps0(b.x_t, b.t, b.emb)
        return b

    def harmful_loss(self, space: ParamSpace, params: list[Tensor], b: NoisyBatch) -> Tensor:
        """L_h at `params` of `space` on batch b."""
        eps = space.eps(params, b.x_t, b.t, b.emb)
        if self.cfg.harmful_loss == "guidance":
            with torch.no_grad():
                eps_u = space.eps(
                    [p.detach() for p in params], b.x_t, b.t, self.uncond.expand_as(b.emb)
                )
            return guidance_loss(eps, eps_u, b)
        return ga_loss(eps, b) if self.cfg.harmful_loss == "ga" else target_loss(eps, b)
