"""LeanAttnProcessor against diffusers' math AttnProcessor: outputs, gradients and HVPs."""

import copy
import threading

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor

from resalign_fast.models.attention import (
    LeanAttnProcessor,
    attention_mode,
    get_attention_mode,
    set_lean_attention,
)

UNET_CONFIG = dict(
    block_out_channels=(8, 16),
    layers_per_block=1,
    cross_attention_dim=8,
    attention_head_dim=2,
    norm_num_groups=4,
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
DEVICES = ["cpu"] + (
    ["cuda"] if torch.cuda.is_available() else []
)  # CUDA: Triton in "chunked" mode
CHUNK = 5  # 64 and 16 query tokens: several chunks, the last one partial
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10)}
# fp32: rounding only (bugs show as O(1) errors; fp64 checks the maths to 1e-10). A double backward
# through 8 attention layers measured 1.07e-5 on an AVX-512 machine (2026-12-01), so 1e-5 was too
# tight.
FP32_REL = 1e-4


def _close(got, want, dtype):
    """fp64: elementwise 1e-10; fp32: max error relative to the largest reference entry."""
    for g, w in zip(got, want, strict=True):
        if dtype == torch.float64:
            torch.testing.assert_close(g, w, **TOL[dtype])
        else:
            rel = (g - w).abs().max() / w.abs().max().clamp_min(1e-30)
            assert rel <= FP32_REL, f"relative error {rel:.2e} > {FP32_REL}"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops on a shared 2-core machine: 2 threads made one fp32 HVP take 13-36 s, 1 thread
    0.5 s."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def unet64():
    torch.manual_seed(0)
    return UNet2DConditionModel(**UNET_CONFIG).double().eval()


def _inputs(dtype, seed, device):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=dtype)
    ctx = torch.randn(2, 7, 8, generator=g, dtype=dtype)
    keep = torch.ones(2, 7, dtype=dtype)
    keep[0, 4:] = 0  # cross-attention key padding mask: the UNet turns it into an additive bias
    target = torch.randn(2, 4, 8, 8, generator=g, dtype=dtype)
    return [y.to(device) for y in (x, torch.tensor([10, 500]), ctx, keep, target)]


def _models(unet64, dtype, device):
    """(reference with AttnProcessor, lean) copies of the same UNet in `dtype` on `device`."""
    ref = copy.deepcopy(unet64).to(device, dtype)
    ref.set_attn_processor(AttnProcessor())
    lean = copy.deepcopy(unet64).to(device, dtype)
    assert set_lean_attention(lean, chunk=CHUNK) == len(lean.attn_processors) == 8
    assert all(isinstance(p, LeanAttnProcessor) for p in lean.attn_processors.values())
    return ref, lean


def _loss_fn(model, x, t, ctx, keep, target):
    names = [n for n, _ in model.named_parameters()]

    def loss(params, x, ctx):
        out = torch.func.functional_call(
            model, dict(zip(names, params)), (x, t, ctx), {"encoder_attention_mask": keep}
        ).sample
        return ((out - target) ** 2).mean()

    return loss


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["fused", "chunked", "math"])
def test_unet_outputs_and_grads_match_attnprocessor(unet64, mode, dtype, device):
    ref, lean = _models(unet64, dtype, device)
    x, t, ctx, keep, target = _inputs(dtype, 1, device)
    results = []
    for model, m in ((ref, "math"), (lean, mode)):
        params = tuple(p.detach().requires_grad_() for p in model.parameters())
        xi, ci = x.clone().requires_grad_(), ctx.clone().requires_grad_()
        with attention_mode(m):
            loss = _loss_fn(model, x, t, ctx, keep, target)(params, xi, ci)
            grads = torch.autograd.grad(loss, (*params, xi, ci))
        results.append((loss.detach(), *grads))
    _close(results[1], results[0], dtype)


def _hvp_double_backward(loss, params, x, ctx, vec):
    params = tuple(p.detach().requires_grad_() for p in params)
    grads = torch.autograd.grad(loss(params, x, ctx), params, create_graph=True)
    return torch.autograd.grad(grads, params, vec)


def _hvp_jvp_of_grad(loss, params, x, ctx, vec):
    return torch.func.jvp(lambda p: torch.func.grad(loss)(p, x, ctx), (params,), (vec,))[1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "hvp", [_hvp_double_backward, _hvp_jvp_of_grad], ids=["double_backward", "jvp_of_grad"]
)
@pytest.mark.parametrize("mode", ["chunked", "math"])
def test_unet_hvp_matches_attnprocessor(unet64, mode, hvp, dtype, device):
    ref, lean = _models(unet64, dtype, device)
    x, t, ctx, keep, target = _inputs(dtype, 2, device)
    params = tuple(p.detach() for p in ref.parameters())
    vec = tuple(torch.randn_like(p) for p in params)
    with attention_mode("math"):
        want = hvp(_loss_fn(ref, x, t, ctx, keep, target), params, x, ctx, vec)
    with attention_mode(mode):
        got = hvp(_loss_fn(lean, x, t, ctx, keep, target), params, x, ctx, vec)
    assert max(w.abs().max() for w in want) > 0
    _close(got, want, dtype)


@pytest.mark.parametrize("mode", ["fused", "chunked", "math"])
def test_attention_module_norms_masks_residual(mode):
    """A VAE-style attention (group norm, 4-D input, residual, rescale) and a masked
    cross-attention."""
    torch.manual_seed(3)
    dt = torch.float64
    spatial = Attention(
        8,
        heads=2,
        dim_head=4,
        norm_num_groups=4,
        residual_connection=True,
        rescale_output_factor=2.0,
        bias=True,
    ).to(dt)
    cross = Attention(
        8, cross_attention_dim=6, heads=2, dim_head=3, cross_attention_norm="layer_norm"
    ).to(dt)
    h4 = torch.randn(2, 8, 3, 5, dtype=dt, requires_grad=True)
    h3 = torch.randn(2, 11, 8, dtype=dt, requires_grad=True)
    enc = torch.randn(2, 9, 6, dtype=dt, requires_grad=True)
    mask = torch.randn(2, 1, 9, dtype=dt)  # additive bias over the 9 keys, as the UNet passes it
    mask[1, 0, 6:] = -10000.0
    outs = []
    for processor, m in ((AttnProcessor(), "math"), (LeanAttnProcessor(chunk=4), mode)):
        spatial.set_processor(processor)
        cross.set_processor(processor)
        with attention_mode(m):
            y = spatial(h4).square().sum() + cross(h3, enc, attention_mask=mask).square().sum()
            params = [*spatial.parameters(), *cross.parameters()]
            outs.append((y, *torch.autograd.grad(y, [h4, h3, enc, *params])))
    _close(outs[1], outs[0], dt)


def test_attention_mode_is_process_wide_and_restored():
    assert get_attention_mode() == "fused"
    seen = []
    with attention_mode("chunked"):
        worker = threading.Thread(target=lambda: seen.append(get_attention_mode()))
        worker.start()
        worker.join()
        with attention_mode("math"):
            assert get_attention_mode() == "math"
        assert get_attention_mode() == "chunked"
    assert seen == ["chunked"]  # autograd's worker threads must see the mode too
    assert get_attention_mode() == "fused"
    with pytest.raises(ValueError, match="must be one of"):
        with attention_mode("flash"):
            pass


def test_set_lean_attention_rejects_model_without_attention():
    with pytest.raises(ValueError, match="no diffusers Attention"):
        set_lean_attention(torch.nn.Linear(2, 2))
