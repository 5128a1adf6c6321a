"""Shared test set-up: CPU-only, Triton through its interpreter, one thread (the suite runs on 2
shared cores)."""

import os

import pytest
import torch

if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TINY_DIGITS_UNET = dict(
    block_out_channels=(8, 16),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=8,
    attention_head_dim=2,
    norm_num_groups=4,
)
TINY_TEXT = dict(
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    projection_dim=8,
)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A digits-format model folder (16x16 greyscale, random tiny UNet and text encoder), saved
    once."""
    from resalign_fast.models.pipeline import build_digits_model, save_model

    out = tmp_path_factory.mktemp("tiny_model")
    save_model(build_digits_model(0, TINY_DIGITS_UNET, TINY_TEXT), out)
    return out


@pytest.fixture(scope="session")
def tiny_ft_space(tmp_path_factory):
    """A small pi(C) covering every algorithm/loss/optimizer with 2-step runs."""
    p = tmp_path_factory.mktemp("ft") / "tiny.toml"
    p.write_text(
        '[space]\nlr = [1e-3]\nsteps = [2]\nloss = ["standard", "dreambooth"]\n'
        'algorithm = ["full", "lora"]\noptimizer = ["sgd", "adam"]\n[fixed]\nbatch_size = 2\n'
    )
    return p


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "deepspeed: DeepSpeed smoke tests (JIT-build an op on first use)"
    )
