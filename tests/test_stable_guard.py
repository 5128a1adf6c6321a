"""The stable guard against closed forms on fp64 quadratics with a stiff spectrum.

ft(phi) = 1/2 phi^T A phi has Hessian A, so the implicit answer v* = (I + gamma A)^-1 b is exact.
"""

from __future__ import annotations

import pytest
import torch

from resalign_fast.hypergrad import guarded_hypergrad
from resalign_fast.hypergrad.stable import power_iteration, stable_hypergrad
from tests.test_hypergrad import DT, N, cat, matvec, rel, spd, split


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(11)


def exact(a: torch.Tensor, b: torch.Tensor, gamma: float) -> torch.Tensor:
    return torch.linalg.solve(torch.eye(N, dtype=DT) + gamma * a, b)


def test_power_iteration_finds_the_top_eigenvalue(gen):
    a = spd(gen, 0.0, 100.0)
    mu, u, calls = power_iteration(matvec(a), split(torch.randn(N, generator=gen, dtype=DT)), 300)
    assert calls == 300 and mu == pytest.approx(100.0, rel=1e-3)
    # warm start from the eigenvector: one HVP gives the eigenvalue
    mu1, _, _ = power_iteration(matvec(a), u, 1)
    assert mu1 == pytest.approx(100.0, rel=1e-3)


def test_stiff_spectrum_reference_falls_back_stable_converges(gen):
    """gamma * top curvature = 100: the reference guard halves alpha 5 times and drops the
    resilience term; the stable guard solves it with no retry."""
    a, b = spd(gen, 0.0, 100.0), torch.randn(N, generator=gen, dtype=DT)
    direct = torch.randn(N, generator=gen, dtype=DT)
    _, ref = guarded_hypergrad(split(direct), split(b), matvec(a), iters=5, max_grad_norm=None)
    assert ref.fallback and ref.retries == 5
    want = direct + exact(a, b, 1.0)
    calls = []
    g, info, _ = stable_hypergrad(
        split(direct), split(b), matvec(a, calls), gamma=1.0, iters=5, power_iters=3
    )
    assert not info.fallback and len(calls) == info.hvps == 8
    # closer than both the first-order answer (v = b) and the reference's fallback (v = 0)
    err = rel(g, split(want))
    assert err < 0.5 * rel(split(direct + b), split(want)) and err < 0.5 * rel(
        split(direct), split(want)
    )
    # and it converges to the exact answer
    g, info, _ = stable_hypergrad(
        split(direct), split(b), matvec(a), gamma=1.0, iters=3000, power_iters=20
    )
    assert not info.fallback and rel(g, split(want)) < 1e-8


@pytest.mark.parametrize("gamma", [0.01, 1.0, 10.0])
def test_mild_spectrum_matches_closed_form(gen, gamma):
    a, b = spd(gen, 0.0, 2.0), torch.randn(N, generator=gen, dtype=DT)
    direct = torch.zeros(N, dtype=DT)
    g, info, _ = stable_hypergrad(
        split(direct), split(b), matvec(a), gamma=gamma, iters=400, power_iters=30
    )
    assert not info.fallback and rel(g, split(exact(a, b, gamma))) < 1e-6


def test_fallback_keeps_the_first_order_term(gen):
    """Negative curvature beyond -1/gamma: no solve, g = direct + pullback(b), not direct."""
    a, b = spd(gen, -3.0, -2.0), torch.randn(N, generator=gen, dtype=DT)
    direct = torch.randn(N, generator=gen, dtype=DT)
    g, info, _ = stable_hypergrad(
        split(direct), split(b), matvec(a), gamma=1.0, iters=5, power_iters=3
    )
    assert info.fallback and "positive definite" in info.reasons[-1]
    assert torch.equal(cat(g), direct + b)
    # a non-finite HVP also falls back to first order
    g, info, _ = stable_hypergrad(
        split(direct), split(b), lambda v: [x * float("nan") for x in v], gamma=1.0
    )
    assert info.fallback and torch.equal(cat(g), direct + b)


def test_gamma_zero_is_first_order_without_hvps(gen):
    b, direct = torch.randn(N, generator=gen, dtype=DT), torch.randn(N, generator=gen, dtype=DT)
    calls = []
    g, info, _ = stable_hypergrad(
        split(direct), split(b), matvec(torch.eye(N, dtype=DT), calls), gamma=0.0
    )
    assert not calls and not info.fallback and torch.equal(cat(g), direct + b)


def test_pullback_and_warm_start(gen):
    a, b = spd(gen, 0.0, 50.0), torch.randn(N, generator=gen, dtype=DT)
    direct = torch.zeros(3, dtype=DT)
    p = torch.randn(3, N, generator=gen, dtype=DT)  # pullback: v -> P v
    g, info, u = stable_hypergrad(
        [direct],
        split(b),
        matvec(a),
        gamma=1.0,
        iters=2000,
        power_iters=40,
        pullback=lambda v: [p @ cat(v)],
    )
    assert not info.fallback and rel(g, [p @ exact(a, b, 1.0)]) < 1e-7
    # the returned eigenvector warm-starts the next call: one power HVP suffices for the same step
    calls = []
    _, warm, _ = stable_hypergrad(
        [direct], split(b), matvec(a, calls), gamma=1.0, iters=5, power_iters=4, warm=u
    )
    assert len(calls) == warm.hvps == 1 + 5  # one power HVP from a warm start
    _, cold, _ = stable_hypergrad([direct], split(b), matvec(a), gamma=1.0, iters=5, power_iters=1)
    assert warm.alpha_used == pytest.approx(info.alpha_used, rel=1e-2)
    assert abs(warm.alpha_used - info.alpha_used) < 0.2 * abs(cold.alpha_used - info.alpha_used)


def test_solve_with_b_in_other_memory_and_identity_hvp_matches_plain():
    """`device` given: b is read tensor by tensor from where it waits and u comes back there; an HVP
    that returns its input (H = I) is not overwritten by the in-place residual."""
    torch.manual_seed(0)
    A = torch.randn(6, 6, dtype=torch.float64)
    H = A @ A.T / 6
    b = [torch.randn(6, dtype=torch.float64)]
    d = [torch.zeros(6, dtype=torch.float64)]
    plain, _, u0 = stable_hypergrad(d, b, lambda v: [H @ v[0]], gamma=0.5, iters=40)
    moved, _, u1 = stable_hypergrad(
        d, b, lambda v: [H @ v[0]], gamma=0.5, iters=40, device=torch.device("cpu")
    )
    assert torch.equal(plain[0], moved[0]) and torch.equal(u0[0], u1[0])
    want = torch.linalg.solve(torch.eye(6, dtype=torch.float64) + 0.5 * H, b[0])
    assert torch.allclose(plain[0], want, rtol=1e-6, atol=1e-9)
    ident, info, _ = stable_hypergrad(d, b, lambda v: v, gamma=1.0, iters=30)
    assert not info.fallback and torch.allclose(ident[0], b[0] / 2, rtol=1e-6)  # (I + I)^-1 b
