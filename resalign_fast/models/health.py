"""Is a UNet fit to be saved? Its weights and its own output on a fixed probe batch are checked
before every save and export, so that a diverged run never leaves a loadable model behind.

A run can diverge while every loss it logged was finite: `finetune --learning_rate inf` turns the
weights NaN in its last step, `train --lr 1e6` left theta finite but the merged UNet's outputs NaN
(weights up to 2e10).
"""

from __future__ import annotations

import torch

# fp16's largest value: SD checkpoints ship in fp16, so a weight beyond it cannot even be stored
# there
MAX_ABS_WEIGHT = 65504.0
# the denoiser's target (noise, or v) has RMS 1 at every timestep; 1000x that is no prediction
MAX_OUTPUT_RMS = 1e3
PROBE_SEED = 1234


class UnhealthyModel(RuntimeError):
    """Non-finite or exploding weights or outputs; the message says which and where."""


@torch.no_grad()
def check_weights(unet: torch.nn.Module) -> None:
    """Raises UnhealthyModel naming the first parameter that is non-finite or above
    MAX_ABS_WEIGHT."""
    for name, p in unet.named_parameters():
        v = p.detach()
        if not torch.isfinite(v).all():
            n = int((~torch.isfinite(v)).sum())
            raise UnhealthyModel(f"weight {name} holds {n} NaN/inf value(s) of {v.numel()}")
        m = float(v.abs().max()) if v.numel() else 0.0
        if m > MAX_ABS_WEIGHT:
            raise UnhealthyModel(
                f"weight {name} reaches |w| = {m:.3g} (limit {MAX_ABS_WEIGHT:g}: the run exploded)"
            )


@torch.no_grad()
def probe_output(unet: torch.nn.Module, model, n: int = 2) -> float:
    """RMS of `unet`'s prediction on a fixed probe batch (seeded noise, the empty prompt and one
    ordinary prompt, an early and a late timestep) of `model`'s latent shape.

    Raises:
        UnhealthyModel: a non-finite prediction, or RMS above MAX_OUTPUT_RMS.
    """
    p = next(unet.parameters())
    c, s = int(unet.config.in_channels), int(unet.config.sample_size)
    g = torch.Generator().manual_seed(PROBE_SEED)
    x = torch.randn((n, c, s, s), generator=g).to(p.device, p.dtype)
    steps = int(getattr(model.scheduler.config, "num_train_timesteps", 1000))
    t = torch.linspace(steps // 10, steps - steps // 10, n).long().to(p.device)
    emb = model.encode_prompts(["", "a photo"][:n] + [""] * max(0, n - 2)).to(p.device, p.dtype)
    was_training = unet.training
    unet.eval()
    try:
        out = unet(x, t, emb).sample.float()
    finally:
        unet.train(was_training)
    if not torch.isfinite(out).all():
        raise UnhealthyModel(
            f"the model's prediction on a probe batch is non-finite "
            f"({int((~torch.isfinite(out)).sum())} of {out.numel()} values)"
        )
    rms = float(out.pow(2).mean().sqrt())
    if rms > MAX_OUTPUT_RMS:
        raise UnhealthyModel(
            f"the model's prediction on a probe batch has RMS {rms:.3g} "
            f"(the target's is 1; limit {MAX_OUTPUT_RMS:g}: the run exploded)"
        )
    return rms


def check_unet(unet: torch.nn.Module, model) -> float:
    """check_weights then probe_output; returns the probe RMS."""
    check_weights(unet)
    return probe_output(unet, model)
