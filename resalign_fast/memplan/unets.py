"""UNet configurations known to the planner, and building a UNet (real or meta) with LoRA.

SD v1.4's UNet config is the public `unet/config.json` of CompVis/stable-diffusion-v1-4, written
out here so that nothing is downloaded; `diffusers.UNet2DConditionModel(**SD_V1_4_UNET)` has
859,520,964 parameters. Text embeddings are (B, 77, 768) (CLIP ViT-L/14), latents (B, 4, R/8, R/8).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

SD_V1_4_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
}

# A two-level UNet of the same block types (about 0.3M parameters), for CPU validation.
TINY_UNET: dict[str, Any] = {
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}


@dataclass(frozen=True)
class ModelSpec:
    """A UNet and the shapes of its conditioning.

    Attributes:
        unet: keyword arguments of `diffusers.UNet2DConditionModel`.
        text_len: tokens per prompt embedding.
        vae_factor: pixels per latent cell.
    """

    unet: dict[str, Any]
    text_len: int = 77
    vae_factor: int = 8

    def latent_shape(self, batch: int, resolution: int) -> tuple[int, int, int, int]:
        """(B, C, R/f, R/f) latents for `resolution` pixels.

        Raises:
            ValueError: resolution not a multiple of the VAE factor times the UNet's down factor.
        """
        down = 2 ** (len(self.unet["block_out_channels"]) - 1)
        if resolution % (self.vae_factor * down):
            raise ValueError(f"resolution {resolution} must be a multiple of {self.vae_factor * down}")
        side = resolution // self.vae_factor
        return (batch, self.unet["in_channels"], side, side)

    def text_shape(self, batch: int) -> tuple[int, int, int]:
        """(B, L, D) prompt embeddings."""
        return (batch, self.text_len, self.unet["cross_attention_dim"])


MODELS: dict[str, ModelSpec] = {
    "sd-v1-4": ModelSpec(SD_V1_4_UNET),
    "tiny": ModelSpec(TINY_UNET, text_len=7, vae_factor=1),
}

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def build_unet(spec: ModelSpec, *, dtype: torch.dtype = torch.float32, lora_rank: int = 4,
               seed: int = 0) -> torch.nn.Module:
    """Build a randomly initialised UNet with rank-`lora_rank` LoRA on every attention layer.

    Call it inside `torch.device("meta")` for a UNet without memory. Base weights are frozen and cast to `dtype`; LoRA weights stay fp32 and trainable (how
    diffusers' LoRA scripts keep them).

    Args:
        spec: the model.
        dtype: dtype of the frozen base weights.
        lora_rank: LoRA rank r (lora_alpha = r, as in the reference); 0 adds no adapter.
        seed: initialisation seed (real tensors only).

    Returns:
        The UNet in train mode with the adapter "default" active.
    """
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**spec.unet)
    unet.requires_grad_(False)
    for p in unet.parameters():  # per tensor: keeps LoRA added below in fp32
        p.data = p.data.to(dtype)
    if lora_rank == 0:
        return unet.train()
    unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                target_modules=LORA_TARGETS))
    for n, p in unet.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()
            p.requires_grad_(True)
    unet.train()
    return unet


def lora_names(unet: torch.nn.Module) -> list[str]:
    """Names of the LoRA parameters (the unlearning parameters theta)."""
    return [n for n, _ in unet.named_parameters() if "lora_" in n]

