"""Activation recomputation (gradient checkpointing) that is correct under functional calls.

diffusers checkpoints each UNet block with torch.utils.checkpoint (non-reentrant). We run the UNet
through `torch.func.functional_call` with substituted parameters (theta, theta*, phi + eps v), and
the recomputation happens later, during backward, when the substitution has been undone: the block
would be recomputed with the module's own parameters (wrong values; torch raises "a different number
of tensors was saved" or, worse, silently differs). The same holds for LoRA adapters switched off
around the call. This checkpoint function captures the block's parameter tensors and adapter state
at forward time and re-binds exactly those when it recomputes. Non-reentrant checkpointing supports
higher-order gradients, so double-backward HVPs recompute too (tests/test_checkpointing.py).
"""

from __future__ import annotations

import torch
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint


def _adapter_layers(module: torch.nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def _checkpoint_bound(module: torch.nn.Module, *args):
    bound = dict(
        module.named_parameters()
    )  # the tensors substituted by an enclosing functional_call
    layers = _adapter_layers(module)
    disabled = [
        m._disable_adapters for m in layers
    ]  # LoRA on/off at forward time (models.lora.adapters_disabled)

    def run(*a):
        now = [m._disable_adapters for m in layers]
        for m, d in zip(layers, disabled):
            m._disable_adapters = d
        try:
            return functional_call(module, bound, a, strict=False)
        finally:
            for m, d in zip(layers, now):
                m._disable_adapters = d

    return checkpoint(run, *args, use_reentrant=False)


def enable_checkpointing(unet: torch.nn.Module) -> None:
    """Checkpoint every block of a diffusers UNet, correctly under functional calls and at every
    order."""
    unet.enable_gradient_checkpointing(gradient_checkpointing_func=_checkpoint_bound)
