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


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_terms_sum_to_the_joint_hvp(gen, backend):
    # L = quartic + quadratic as two terms: the term-by-term HVP equals the joint one and the
    # closed form H = B^T diag(3 (B x)^2) B + A
    bm, m = randn(gen, 7, N), randn(gen, N, N)
    a = m + m.T
    terms = [lambda p: 0.25 * ((bm @ cat(p)) ** 4).sum(), lambda p: 0.5 * cat(p) @ a @ cat(p)]
    x, v = randn(gen, N), randn(gen, N)
    expect = split(bm.T @ (3 * (bm @ x) ** 2 * (bm @ v)) + a @ v)
    h_terms = make_hvp(terms, split(x), backend=backend)
    h_joint = make_hvp(lambda p: terms[0](p) + terms[1](p), split(x), backend=backend)
    tol = 1e-8 if backend == "fd" else 1e-12
    for _ in range(2):  # exact rebuilds its per-term graphs on every call
        assert rel(h_terms(split(v)), expect) < tol
    assert rel(h_terms(split(v)), h_joint(split(v))) < tol


def _leaf_params(x: torch.Tensor) -> list[torch.Tensor]:
    return [t.clone().requires_grad_(True) for t in split(x)]


@pytest.mark.parametrize("terms", [1, 2])
def test_fd_inplace_quadratic_and_restores_params(gen, terms):
    # fd on a quadratic is exact up to rounding; the point comes back to within a few ulps
    m = randn(gen, N, N)
    a, c = m + m.T, randn(gen, N)
    fns = [lambda p: 0.5 * cat(p) @ a @ cat(p), lambda p: c @ cat(p)]
    x, v = randn(gen, N), randn(gen, N)
    params = _leaf_params(x)
    h = make_hvp(
        fns if terms == 2 else (lambda p: fns[0](p) + fns[1](p)), params, backend="fd", inplace=True
    )
    for _ in range(3):
        hv = h(split(v))
        assert rel(hv, split(a @ v)) < 1e-9
        assert all(not t.requires_grad and t.shape == q.shape for t, q in zip(hv, params))
    assert float((cat(params).detach() - x).abs().max()) <= 8 * torch.finfo(DT).eps * float(
        x.abs().max()
    )
    assert all(p.grad is None for p in params)
    assert rel(h(split(v)), make_hvp(fns[0], split(x), backend="fd")(split(v))) < 1e-9


def test_fd_inplace_richardson_matches_closed_form(gen):
    # K Richardson iterations with in-place HVPs: v_K = alpha sum_{j<K} (I - alpha (I + gamma A))^j
    # b
    from resalign_fast.hypergrad.solvers import richardson_solve

    q, _ = torch.linalg.qr(randn(gen, N, N))
    a = q @ torch.diag(torch.linspace(-0.3, 2.0, N, dtype=DT)) @ q.T
    x, b = randn(gen, N), randn(gen, N)
    params = _leaf_params(x)
    h = make_hvp(lambda p: 0.5 * cat(p) @ a @ cat(p), params, backend="fd", inplace=True)
    alpha, gamma, k = 0.7, 0.5, 6
    m = torch.eye(N, dtype=DT) - alpha * (torch.eye(N, dtype=DT) + gamma * a)
    expect = alpha * sum(torch.linalg.matrix_power(m, j) @ b for j in range(k))
    got = richardson_solve(h, split(b), alpha=alpha, gamma=gamma, iters=k)
    assert rel(got, split(expect)) < 1e-9
    assert torch.allclose(cat(params).detach(), x, rtol=0, atol=1e-13)


def test_fd_inplace_unused_params_and_errors(gen):
    params = [randn(gen, 3).requires_grad_(True), randn(gen, 2).requires_grad_(True)]
    h = make_hvp(lambda p: (p[0] ** 3).sum() / 6, params, backend="fd", inplace=True, eps=0.1)
    v = [randn(gen, 3), randn(gen, 2)]
    hv = h(v)
    assert torch.allclose(hv[0], params[0].detach() * v[0], atol=1e-12) and torch.equal(
        hv[1], torch.zeros(2, dtype=DT)
    )
    with pytest.raises(ValueError, match="leaf tensor that requires grad"):
        make_hvp(lambda p: p[0].sum(), [torch.zeros(3)], backend="fd", inplace=True)
    with pytest.raises(ValueError, match="only to backend 'fd'"):
        make_hvp(lambda p: p[0].sum(), params, backend="exact", inplace=True)
    params[0].grad = torch.ones(3, dtype=DT)
    with pytest.raises(ValueError, match="already holds"):
        h(v)


def test_fd_reuses_its_perturbation_buffers(gen, monkeypatch):
    # the evaluation points go into buffers allocated once per make_hvp; results stay distinct
    from resalign_fast.hypergrad import hvp as hvp_mod

    outs = []
    perturb = hvp_mod.fd_perturb

    def spy(x, v, eps, *a, out=None, **k):
        outs.append(None if out is None else tuple(t.data_ptr() for t in out))
        return perturb(x, v, eps, *a, out=out, **k)

    monkeypatch.setattr(hvp_mod, "fd_perturb", spy)
    bm = randn(gen, 7, N)
    h = make_hvp(lambda p: 0.25 * ((bm @ cat(p)) ** 4).sum(), split(randn(gen, N)), backend="fd")
    v1, v2 = split(randn(gen, N)), split(randn(gen, N))
    r1 = h(v1)
    first = list(outs)
    r1_copy = [t.clone() for t in r1]
    h(v2)
    assert None not in outs and outs[len(first) :] == first  # same buffers on every call
    assert all(
        torch.equal(a, b) for a, b in zip(r1, r1_copy)
    )  # an earlier result is not overwritten


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
