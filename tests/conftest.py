"""Shared test set-up: CPU-only, Triton through its interpreter, one thread (the suite runs on 2 shared cores)."""

import os

if not os.environ.get("CUDA_VISIBLE_DEVICES") and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch


def tiny_unet_config(**kw) -> dict:
    """A diffusers UNet2DConditionModel config small enough for second-order tests."""
    cfg = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
               cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4)
    cfg.update(kw)
    return cfg


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
