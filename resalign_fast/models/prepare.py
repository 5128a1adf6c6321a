"""The UNet as the outer step needs it: attention processors, checkpointing, theta's parameters.

`prepare_unet` is the surgery `bilevel.ResAlign` does once; `pass_attention` is the attention mode
of one pass (twice-differentiable chunked attention where a pass is differentiated twice).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import AttnProcessor

from resalign_fast.models.attention import attention_mode, set_lean_attention
from resalign_fast.models.checkpointing import enable_checkpointing
from resalign_fast.models.lora import ParamSpace, add_lora, base_names, lora_names


@dataclass
class PreparedUNet:
    """theta's parameter space on the prepared UNet.

    Attributes:
        space: theta's parameters (LoRA adapter or every base weight).
        original: full theta only: a frozen copy of the original weights in `frozen_dtype` (the
            ESD/preservation teacher); None for LoRA theta (the adapter is disabled instead).
        frozen_dtype: dtype of `original`.
    """

    space: ParamSpace
    original: list[torch.Tensor] | None
    frozen_dtype: torch.dtype


def prepare_unet(
    unet: torch.nn.Module, cfg, frozen_dtype: torch.dtype = torch.float32
) -> PreparedUNet:
    """Set the attention processors and checkpointing of `unet` and make theta trainable.

    Args:
        unet: the model's UNet (modified in place).
        cfg: a `ResAlignConfig` (attention, gradient_checkpointing, theta and the lora_* fields).
        frozen_dtype: dtype of the frozen original copy kept for full theta.
    """
    if cfg.attention == "math":
        unet.set_attn_processor(AttnProcessor())  # math attention: twice differentiable (FACTS.md)
    else:
        set_lean_attention(unet)
    if cfg.gradient_checkpointing:
        enable_checkpointing(unet)
    if cfg.theta == "lora":
        add_lora(unet, cfg.lora_rank, cfg.lora_alpha, cfg.lora_init, cfg.lora_placement)
        prepared = PreparedUNet(
            ParamSpace(unet, lora_names(unet), adapters=True), None, frozen_dtype
        )
    else:
        unet.requires_grad_(False)
        space = ParamSpace(unet, base_names(unet), adapters=True)
        original = [p.detach().to(frozen_dtype, copy=True) for p in space.values()]
        prepared = PreparedUNet(space, original, frozen_dtype)
    for p in prepared.space.values():
        p.requires_grad_(True)
    return prepared


def pass_attention(attention: str, second_order: bool) -> AbstractContextManager:
    """The attention mode of one pass for config value `attention`: "math" or "chunked" in every
    pass; otherwise ("lean", "auto") "chunked" (twice differentiable, O(N chunk)) for passes
    differentiated twice, else "fused"."""
    if attention in ("math", "chunked"):
        return attention_mode(attention)
    return attention_mode("chunked" if second_order else "fused")
