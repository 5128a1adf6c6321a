"""Solvers, implicit hypergradient and guard against closed forms on fp64 quadratic problems.

ft(phi) = 1/2 phi^T A phi + c^T phi has Hessian A everywhere and proximal point
phi*(theta) = (I + gamma A)^-1 (theta - gamma c), so every answer is known exactly.
Vectors are split into a list of two tensors (shapes (2, 3) and (4,)) to exercise the list API.
"""

from __future__ import annotations

import logging

import pytest
import torch

from resalign_fast.hypergrad import (
    GuardInfo,
    cg_solve,
    guarded_hypergrad,
    implicit_hypergrad,
    make_solver,
    neumann_solve,
    richardson_solve,
)

SHAPES = [(2, 3), (4,)]
N = 10
DT = torch.float64


def split(x: torch.Tensor) -> list[torch.Tensor]:
    return [t.reshape(s) for t, s in zip(torch.split(x, [6, 4]), SHAPES)]


def cat(xs) -> torch.Tensor:
    return torch.cat([x.reshape(-1) for x in xs])


def spd(gen: torch.Generator, lo: float, hi: float) -> torch.Tensor:
    """Random symmetric matrix with eigenvalues spread over [lo, hi]."""
    q, _ = torch.linalg.qr(torch.randn(N, N, generator=gen, dtype=DT))
    ev = torch.linspace(lo, hi, N, dtype=DT)[torch.randperm(N, generator=gen)]
    return q @ torch.diag(ev) @ q.T


def matvec(a: torch.Tensor, calls: list | None = None):
    def hvp(v):
        if calls is not None:
            calls.append(1)
        return split(a @ cat(v))

    return hvp


def rel(a, b) -> float:
    a, b = cat(a), cat(b)
    return float((a - b).norm() / b.norm())


def poly(a: torch.Tensor, b: torch.Tensor, alpha: float, gamma: float, terms: int) -> torch.Tensor:
    """alpha * sum_{j < terms} (I - alpha (I + gamma A))^j b."""
    m = torch.eye(N, dtype=DT) - alpha * (torch.eye(N, dtype=DT) + gamma * a)
    out, p = torch.zeros_like(b), b.clone()
    for _ in range(terms):
        out, p = out + p, m @ p
    return alpha * out


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))


# ---------------------------------------------------------------- solvers


@pytest.mark.parametrize("k", [0, 1, 2, 3, 6])
def test_richardson_is_k_term_polynomial(gen, k):
    a, b = spd(gen, -0.5, 2.0), torch.randn(N, generator=gen, dtype=DT)
    alpha, gamma, calls = 0.7, 0.8, []
    v = richardson_solve(matvec(a, calls), split(b), alpha=alpha, gamma=gamma, iters=k)
    assert [t.shape for t in v] == [torch.Size(s) for s in SHAPES]
    expect = poly(a, b, alpha, gamma, k)
    assert torch.allclose(cat(v), expect, rtol=1e-12, atol=1e-12)
    assert len(calls) == max(k - 1, 0)  # H v_0 = 0 is never computed


@pytest.mark.parametrize("k", [0, 1, 4])
def test_neumann_is_k_plus_one_term_polynomial(gen, k):
    a, b = spd(gen, 0.0, 1.5), torch.randn(N, generator=gen, dtype=DT)
    calls = []
    v = neumann_solve(matvec(a, calls), split(b), alpha=0.6, gamma=1.3, iters=k)
    assert torch.allclose(cat(v), poly(a, b, 0.6, 1.3, k + 1), rtol=1e-12, atol=1e-12)
    assert len(calls) == k


@pytest.mark.parametrize("name", ["richardson", "neumann", "cg"])
def test_solvers_converge_to_inverse(gen, name):
    a, b = spd(gen, 0.0, 2.0), torch.randn(N, generator=gen, dtype=DT)
    gamma = 0.5
    kw = {"gamma": gamma, "iters": N if name == "cg" else 200}
    if name != "cg":
        kw["alpha"] = 2.0 / (
            2.0 + gamma * 2.0
        )  # optimal step for spectrum of I + gamma A in [1, 2]
    v = make_solver(name, **kw)(matvec(a), split(b))
    expect = torch.linalg.solve(torch.eye(N, dtype=DT) + gamma * a, b)
    assert rel(v, split(expect)) < 1e-9


def test_cg_tol_stops_early_and_rejects_indefinite(gen):
    a, b = spd(gen, 0.0, 1.0), torch.randn(N, generator=gen, dtype=DT)
    calls = []
    v = cg_solve(matvec(a, calls), split(b), gamma=1.0, iters=50, tol=1e-8)
    assert len(calls) <= N + 1
    r = b - (torch.eye(N, dtype=DT) + a) @ cat(v)
    assert r.norm() <= 1e-8 * b.norm()
    with pytest.raises(ValueError, match="not positive"):
        cg_solve(matvec(spd(gen, -3.0, -2.0)), split(b), gamma=1.0, iters=5)


def test_make_solver_errors():
    with pytest.raises(ValueError, match="unknown solver"):
        make_solver("lbfgs")
    with pytest.raises(ValueError, match="alpha"):
        make_solver("cg", alpha=1.0)


# ------------------------------------------------------- implicit hypergrad


def quad_problem(gen):
    a = spd(gen, 0.0, 1.5)
    c = torch.randn(N, generator=gen, dtype=DT)
    w = torch.randn(N, generator=gen, dtype=DT)
    t0 = torch.randn(N, generator=gen, dtype=DT)

    def ft_loss(phi):
        x = cat(phi)
        return 0.5 * x @ a @ x + c @ x

    def outer_vec(theta, phi):  # nonlinear in both arguments
        return (
            (torch.sin(phi) * w).sum() + 0.3 * (theta @ phi) ** 2 + 0.5 * ((theta - t0) ** 2).sum()
        )

    def outer_loss(theta, phi):
        return outer_vec(cat(theta), cat(phi))

    return a, c, ft_loss, outer_vec, outer_loss


@pytest.mark.parametrize("hvp", ["exact", "jvp", "fd"])
@pytest.mark.parametrize("solver", ["richardson", "neumann", "cg"])
def test_implicit_hypergrad_matches_closed_form(gen, solver, hvp):
    a, c, ft_loss, outer_vec, outer_loss = quad_problem(gen)
    gamma = 0.7
    theta = torch.randn(N, generator=gen, dtype=DT)
    prox = torch.eye(N, dtype=DT) + gamma * a

    def total(th):  # outer(theta, phi*(theta)) in closed form
        return outer_vec(th, torch.linalg.solve(prox, th - gamma * c))

    th = theta.clone().requires_grad_(True)
    (expect,) = torch.autograd.grad(total(th), th)
    phi_star = torch.linalg.solve(prox, theta - gamma * c)
    # phi* is the proximal point: grad ft + (phi - theta) / gamma = 0
    assert torch.allclose(
        a @ phi_star + c + (phi_star - theta) / gamma, torch.zeros(N, dtype=DT), atol=1e-12
    )
    theta_l, star_l = split(theta), split(phi_star)
    iters = N if solver == "cg" else 120
    g = implicit_hypergrad(
        theta_l,
        star_l,
        outer_loss,
        ft_loss,
        gamma=gamma,
        iters=iters,
        alpha=0.8,
        solver=solver,
        hvp=hvp,
    )
    assert all(not t.requires_grad for t in g)
    assert rel(g, split(expect)) < (1e-7 if hvp == "fd" else 1e-9)
    assert all(not t.requires_grad for t in theta_l + star_l)  # inputs untouched


def test_implicit_hypergrad_k_steps_is_polynomial(gen):
    a, c, ft_loss, outer_vec, outer_loss = quad_problem(gen)
    theta, star = torch.randn(N, generator=gen, dtype=DT), torch.randn(N, generator=gen, dtype=DT)
    th, ph = theta.clone().requires_grad_(True), star.clone().requires_grad_(True)
    d1, d2 = torch.autograd.grad(outer_vec(th, ph), (th, ph))
    g = implicit_hypergrad(
        split(theta), split(star), outer_loss, ft_loss, gamma=1.0, iters=5, alpha=1.0
    )
    assert torch.allclose(cat(g), d1 + poly(a, d2, 1.0, 1.0, 5), rtol=1e-12, atol=1e-12)


def test_implicit_hypergrad_shape_mismatch():
    with pytest.raises(ValueError, match="same shapes"):
        implicit_hypergrad(
            [torch.zeros(3)], [torch.zeros(4)], lambda a, b: a[0].sum(), lambda p: p[0].sum()
        )


# ----------------------------------------------------------------- guard


def guard_records(caplog):
    return [r for r in caplog.records if r.name == "resalign_fast.hypergrad"]


def test_guard_accepts_convergent_solve(gen, caplog):
    a, b = spd(gen, 0.0, 0.5), torch.randn(N, generator=gen, dtype=DT)
    direct = torch.randn(N, generator=gen, dtype=DT)
    calls = []
    with caplog.at_level(logging.WARNING, logger="resalign_fast.hypergrad"):
        g, info = guarded_hypergrad(
            split(direct), split(b), matvec(a, calls), iters=5, max_grad_norm=1e9
        )
    assert isinstance(info, GuardInfo) and info.retries == 0 and not info.fallback
    assert torch.allclose(cat(g), direct + poly(a, b, 1.0, 1.0, 5), rtol=1e-12, atol=1e-12)
    assert info.hvps == len(calls) == 4 and info.max_ratio <= 1.0
    res = b - (torch.eye(N, dtype=DT) + a) @ poly(a, b, 1.0, 1.0, 4)  # residual at v_{K-1}
    assert info.rel_residual == pytest.approx(float(res.norm() / b.norm()), rel=1e-9)
    assert not guard_records(caplog)


def test_guard_halves_alpha_when_iteration_diverges(gen, caplog):
    # eigenvalues of A in [1.5, 2.5], gamma = 1: alpha = 1 gives |1 - (1 + h)| >= 1.5 (diverges),
    # alpha = 0.5 gives |1 - (1 + h) / 2| <= 0.75 (converges).
    a, b = spd(gen, 1.5, 2.5), torch.randn(N, generator=gen, dtype=DT)
    direct = torch.randn(N, generator=gen, dtype=DT)
    calls = []
    with caplog.at_level(logging.WARNING, logger="resalign_fast.hypergrad"):
        g, info = guarded_hypergrad(
            split(direct), split(b), matvec(a, calls), iters=5, max_grad_norm=1e9
        )
    assert info.retries == 1 and not info.fallback and info.alpha_used == 0.5
    assert torch.allclose(cat(g), direct + poly(a, b, 0.5, 1.0, 5), rtol=1e-12, atol=1e-12)
    assert len(calls) == 1 + 4  # the diverging attempt stopped after its first HVP
    recs = guard_records(caplog)
    assert (
        len(recs) == 1
        and "retry 1/5" in recs[0].getMessage()
        and "diverged" in recs[0].getMessage()
    )


def test_guard_halves_alpha_on_grad_norm(gen, caplog):
    a, b = spd(gen, 0.0, 0.5), torch.randn(N, generator=gen, dtype=DT)
    direct = torch.zeros(N, dtype=DT)
    limit = 0.3 * float(poly(a, b, 1.0, 1.0, 3).norm())
    alpha, expect_retries = 1.0, 0
    while float(poly(a, b, alpha, 1.0, 3).norm()) > limit:
        alpha, expect_retries = alpha / 2, expect_retries + 1
    assert 1 <= expect_retries <= 5
    with caplog.at_level(logging.WARNING, logger="resalign_fast.hypergrad"):
        g, info = guarded_hypergrad(
            split(direct), split(b), matvec(a), iters=3, max_grad_norm=limit
        )
    assert info.retries == expect_retries and info.alpha_used == alpha and not info.fallback
    assert torch.allclose(cat(g), poly(a, b, alpha, 1.0, 3), rtol=1e-12, atol=1e-12)
    assert info.grad_norm <= limit
    recs = guard_records(caplog)
    assert len(recs) == expect_retries and all("max_grad_norm" in r.getMessage() for r in recs)


def test_guard_falls_back_after_max_retries(gen, caplog):
    # eigenvalues 200..300: |1 - alpha (1 + h)| > 1 for every alpha >= 1/8
    a, b = spd(gen, 200.0, 300.0), torch.randn(N, generator=gen, dtype=DT)
    direct = torch.randn(N, generator=gen, dtype=DT)
    with caplog.at_level(logging.WARNING, logger="resalign_fast.hypergrad"):
        g, info = guarded_hypergrad(
            split(direct), split(b), matvec(a), iters=5, max_grad_norm=1e9, max_retries=3
        )
    assert info.fallback and info.retries == 3 and info.alpha_used == 0.125
    assert torch.equal(cat(g), direct) and info.grad_norm == pytest.approx(float(direct.norm()))
    recs = guard_records(caplog)
    assert len(recs) == 4
    assert [("retry" in r.getMessage()) for r in recs] == [True, True, True, False]
    assert "fallback" in recs[-1].getMessage()


def test_guard_fallback_when_direct_exceeds_norm(gen, caplog):
    a, b = spd(gen, 0.0, 0.5), torch.randn(N, generator=gen, dtype=DT)
    direct = torch.randn(N, generator=gen, dtype=DT)
    direct = direct / direct.norm()
    with caplog.at_level(logging.WARNING, logger="resalign_fast.hypergrad"):
        g, info = guarded_hypergrad(
            split(direct), split(1e-3 * b), matvec(a), max_grad_norm=0.5, max_retries=2
        )
    assert info.fallback and info.retries == 2 and torch.equal(cat(g), direct)
    assert len(guard_records(caplog)) == 3


def test_guard_cg_and_errors(gen, caplog):
    b, direct = torch.randn(N, generator=gen, dtype=DT), torch.randn(N, generator=gen, dtype=DT)
    a = spd(gen, 0.0, 1.0)
    g, info = guarded_hypergrad(
        split(direct), split(b), matvec(a), iters=N, max_grad_norm=None, solver="cg"
    )
    expect = direct + torch.linalg.solve(torch.eye(N, dtype=DT) + a, b)
    assert rel(g, split(expect)) < 1e-9 and not info.fallback
    with caplog.at_level(logging.WARNING, logger="resalign_fast.hypergrad"):
        g, info = guarded_hypergrad(
            split(direct), split(b), matvec(spd(gen, -3.0, -2.0)), solver="cg"
        )
    assert info.fallback and info.retries == 0 and torch.equal(cat(g), direct)
    assert len(guard_records(caplog)) == 1
    with pytest.raises(ValueError, match="not finite"):
        guarded_hypergrad(split(direct * float("nan")), split(b), matvec(a))
    with pytest.raises(ValueError, match="unknown solver"):
        guarded_hypergrad(split(direct), split(b), matvec(a), solver="lbfgs")
