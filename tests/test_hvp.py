"""HVP backends against closed forms (fp64) and against ``exact`` on a tiny diffusers UNet."""

from __future__ import annotations

import pytest
import torch

from resalign_fast.hypergrad import make_hvp
from resalign_fast.hypergrad.hvp import BACKENDS, fd_eps

DT = torch.float64
SHAPES = [(3, 2), (5,)]
N = 11


def split(x: torch.Tensor) -> list[torch.Tensor]:
    return [t.reshape(s) for t, s in zip(torch.split(x, [6, 5]), SHAPES)]


def cat(xs) -> torch.Tensor:
    return torch.cat([x.reshape(-1) for x in xs])


def rel(a, b) -> float:
    a, b = cat(a), cat(b)
    return float((a - b).norm() / b.norm())


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))


def randn(gen, *shape, dtype=DT):
    return torch.randn(*shape, generator=gen, dtype=dtype)


# ------------------------------------------------------------ closed forms


@pytest.mark.parametrize("backend", BACKENDS)
def test_quadratic_hvp_is_a_times_v(gen, backend):
    m = randn(gen, N, N)
    a, c = m + m.T, randn(gen, N)  # symmetric, indefinite

    def loss(p):
        x = cat(p)
        return 0.5 * x @ a @ x + c @ x

    x, v = split(randn(gen, N)), split(randn(gen, N))
    hv = make_hvp(loss, x, backend=backend)(v)
    assert [t.shape for t in hv] == [torch.Size(s) for s in SHAPES]
    assert rel(hv, split(a @ cat(v))) < (1e-9 if backend == "fd" else 1e-12)
    assert all(not t.requires_grad for t in hv)


@pytest.mark.parametrize("backend", BACKENDS)
def test_quartic_hvp_closed_form(gen, backend):
    # L = 1/4 sum((B x)^4)  ->  H = B^T diag(3 (B x)^2) B
    bm = randn(gen, 7, N)

    def loss(p):
        return 0.25 * ((bm @ cat(p)) ** 4).sum()

    x, v = randn(gen, N), randn(gen, N)
    expect = bm.T @ (3 * (bm @ x) ** 2 * (bm @ v))
    h = make_hvp(loss, split(x), backend=backend)
    assert rel(h(split(v)), split(expect)) < (1e-8 if backend == "fd" else 1e-12)
    # linear in v (fd: up to its step error), and reusable across calls
    assert rel(h(split(-3.0 * v)), split(-3.0 * expect)) < (1e-8 if backend == "fd" else 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unused_and_linear_params_give_zero_rows(gen, backend):
    w = randn(gen, 4)

    def loss(p):  # p[0] enters quadratically, p[1] linearly, p[2] not at all
        return (p[0] ** 2).sum() * 1.5 + (w * p[1]).sum()

    x = [randn(gen, 3), randn(gen, 4), randn(gen, 2)]
    v = [randn(gen, 3), randn(gen, 4), randn(gen, 2)]
    hv = make_hvp(loss, x, backend=backend)(v)
    assert torch.allclose(hv[0], 3.0 * v[0], rtol=1e-9, atol=1e-9)
    assert torch.allclose(hv[1], torch.zeros(4, dtype=DT), atol=1e-9)
    assert torch.allclose(hv[2], torch.zeros(2, dtype=DT), atol=1e-9)


def test_fd_uses_first_order_autograd_only(gen, monkeypatch):
    seen = []
    real = torch.autograd.grad

    def spy(*args, **kw):
        seen.append(bool(kw.get("create_graph", False)))
        return real(*args, **kw)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    x, v = split(randn(gen, N)), split(randn(gen, N))
    make_hvp(lambda p: (cat(p) ** 4).sum(), x, backend="fd")(v)
    assert seen == [False, False]  # two plain gradients per product


def test_fd_eps_rule(gen):
    x, v = split(randn(gen, N)), split(randn(gen, N))
    u = torch.finfo(DT).eps
    xn, vn = float(cat(x).norm()), float(cat(v).norm())
    assert fd_eps(x, v, scale=1.0) == pytest.approx(u ** (1 / 3) * (1 + xn) / vn, rel=1e-12)
    assert fd_eps(x, [2.0 * t for t in v]) == pytest.approx(fd_eps(x, v) / 2, rel=1e-12)
    x32 = [t.float() for t in x]
    ratio = (torch.finfo(torch.float32).eps / u) ** (1 / 3)
    assert fd_eps(x32, v) == pytest.approx(fd_eps(x, v) * ratio, rel=1e-6)


def test_fd_explicit_eps_and_zero_v(gen):
    # on a cubic L = sum(x^3) / 6 (H = diag(x)), the central difference is exact for every eps
    x, v = randn(gen, N), randn(gen, N)
    h = make_hvp(lambda p: (cat(p) ** 3).sum() / 6, split(x), backend="fd", eps=0.3)
    assert rel(h(split(v)), split(x * v)) < 1e-12
    assert all(torch.equal(t, torch.zeros_like(t)) for t in h(split(torch.zeros(N, dtype=DT))))


def test_make_hvp_errors():
    x = [torch.zeros(3)]
    with pytest.raises(ValueError, match="unknown hvp backend"):
        make_hvp(lambda p: p[0].sum(), x, backend="gauss-newton")
    with pytest.raises(ValueError, match="only to backend 'fd'"):
        make_hvp(lambda p: p[0].sum(), x, backend="exact", eps=1e-3)
    with pytest.raises(ValueError, match="empty"):
        make_hvp(lambda p: p[0].sum(), [])
    h = make_hvp(lambda p: (p[0] ** 2).sum(), x)
    with pytest.raises(ValueError, match="shape"):
        h([torch.zeros(4)])


# ---------------------------------------------------------------- tiny UNet


@pytest.fixture(scope="module")
def unet():
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import AttnProcessor

    model = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    model.set_attn_processor(AttnProcessor())  # SDPA on CPU has no double backward / forward AD
    model.requires_grad_(False)
    return model


PATTERNS = ("attn1.to_q.weight", "attn2.to_k.weight", "conv_in.weight", "time_emb_proj.weight")


def unet_problem(model, dtype):
    """MSE of the UNet output against a random target, as a function of a few of its weights."""
    model = model.to(dtype)
    names = [n for n, _ in model.named_parameters() if any(p in n for p in PATTERNS)]
    weights = dict(model.named_parameters())
    params = [weights[n].detach().clone() for n in names]
    sample, target = torch.randn(1, 4, 8, 8, dtype=dtype), torch.randn(1, 4, 8, 8, dtype=dtype)
    text, t = torch.randn(1, 3, 8, dtype=dtype), torch.tensor([321])

    def loss(p):
        out = torch.func.functional_call(
            model, dict(zip(names, p)), (sample, t), {"encoder_hidden_states": text}, strict=False
        ).sample
        # not F.mse_loss: its mean reduction breaks forward-over-reverse (pytorch/pytorch#123996)
        return (out - target).square().mean()

    return loss, params


def test_unet_jvp_and_fd_match_exact_fp32(unet):
    loss, params = unet_problem(unet, torch.float32)
    assert 1000 < sum(p.numel() for p in params) < 20000
    v = [torch.randn_like(p) for p in params]
    exact = make_hvp(loss, params, backend="exact")(v)
    assert float(cat(exact).norm()) > 0
    assert rel(make_hvp(loss, params, backend="jvp")(v), exact) <= 1e-5
    assert rel(make_hvp(loss, params, backend="fd")(v), exact) <= 1e-3


def test_unet_fd_runs_with_fused_sdpa_attention(unet):
    """fd needs only first-order autograd, so it runs with SDPA (no double backward on CPU)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    loss, params = unet_problem(unet, torch.float32)
    v = [torch.randn_like(p) for p in params]
    exact = make_hvp(loss, params, backend="exact")(v)
    unet.set_attn_processor(AttnProcessor2_0())
    try:
        fd = make_hvp(loss, params, backend="fd")(v)
    finally:
        unet.set_attn_processor(AttnProcessor())
    assert rel(fd, exact) <= 1e-3


def test_unet_exact_matches_finite_difference_fp64(unet):
    loss, params = unet_problem(unet, torch.float64)
    v = [torch.randn_like(p) for p in params]
    exact = make_hvp(loss, params, backend="exact")(v)

    def grad_at(step):  # independent of the fd backend: plain autograd at x + step v
        x = [(p + step * vi).requires_grad_(True) for p, vi in zip(params, v)]
        return torch.autograd.grad(loss(x), x)

    eps = 1e-4 / float(cat(v).norm())
    estimate = [(a - b) / (2 * eps) for a, b in zip(grad_at(eps), grad_at(-eps))]
    assert rel(exact, estimate) <= 1e-6
    unet.to(torch.float32)
