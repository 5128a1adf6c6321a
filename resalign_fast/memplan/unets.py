"""UNet configurations known to the planner, and building a UNet (real or meta) without adapters.

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
            raise ValueError(
                f"resolution {resolution} must be a multiple of {self.vae_factor * down}"
            )
        side = resolution // self.vae_factor
        return (batch, self.unet["in_channels"], side, side)

    def text_shape(self, batch: int) -> tuple[int, int, int]:
        """(B, L, D) prompt embeddings."""
        return (batch, self.text_len, self.unet["cross_attention_dim"])


MODELS: dict[str, ModelSpec] = {
    "sd-v1-4": ModelSpec(SD_V1_4_UNET),
    "tiny": ModelSpec(TINY_UNET, text_len=7, vae_factor=1),
}


def build_unet(
    spec: ModelSpec, *, dtype: torch.dtype = torch.float32, seed: int = 0
) -> torch.nn.Module:
    """Build a randomly initialised UNet without adapters (the trainer adds theta's LoRA).

    Call it inside `torch.device("meta")` for a UNet without memory.

    Args:
        spec: the model.
        dtype: dtype of the weights.
        seed: initialisation seed (real tensors only).

    Returns:
        The UNet in train mode.
    """
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**spec.unet)
    unet.requires_grad_(False)
    for p in unet.parameters():
        p.data = p.data.to(dtype)
    return unet.train()
