"""Activation recomputation gives the same gradients and HVPs (every order) as no recomputation."""

import pytest
import torch
from tiny import tiny_unet_config

from resalign_fast.hypergrad import make_hvp
from resalign_fast.models.checkpointing import enable_checkpointing
from resalign_fast.models.lora import ParamSpace, add_lora, lora_names


def _setup(checkpointing: str):
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor

    torch.manual_seed(0)
    u = UNet2DConditionModel(**tiny_unet_config()).double()
    u.set_attn_processor(AttnProcessor())
    add_lora(u, 2, 2.0)
    if checkpointing == "ours":
        enable_checkpointing(u)
    elif checkpointing == "diffusers":
        u.enable_gradient_checkpointing()
    sp = ParamSpace(u, lora_names(u))
    with torch.no_grad():
        for p in sp.values():
            p.normal_(0, 0.1)
    g = torch.Generator().manual_seed(1)
    x, e = (
        torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64),
        torch.randn(2, 4, 8, generator=g, dtype=torch.float64),
    )
    t = torch.tensor([10, 600])
    theta = [p.detach().clone() for p in sp.values()]
    v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in theta]
    return (lambda p: sp.eps(p, x, t, e).square().mean()), theta, v


def _flat(ts):
    return torch.cat([a.flatten() for a in ts])


@pytest.mark.parametrize("backend", ["exact", "fd"])
def test_checkpointed_hvp_equals_plain(backend):
    ref = _flat(make_hvp(*_setup("none")[:2], backend=backend)(_setup("none")[2]))
    loss, theta, v = _setup("ours")
    got = _flat(make_hvp(loss, theta, backend=backend)(v))
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-14)
    assert ref.norm() > 0


def test_diffusers_default_checkpointing_breaks_under_functional_call():
    """Why models/checkpointing.py exists: the stock recomputation sees the module's own
    parameters."""
    loss, theta, v = _setup("diffusers")
    with pytest.raises(Exception):  # noqa: B017 - any failure: torch words it differently by version
        make_hvp(loss, theta, backend="exact")(v)
