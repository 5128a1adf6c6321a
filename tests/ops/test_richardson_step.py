"""richardson_step: every backend against richardson_step_ref, and the iteration against a solve."""

import pytest
import torch
from _ops_testing import (
    assert_close_to_truth,
    case,
    cases,
    device_for,
    exact_sq_norm,
    generator,
    randn,
)

from resalign_fast.ops import registry
from resalign_fast.ops.richardson_step import richardson_step, richardson_step_ref

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("backend,dtype_name,size", cases())
def test_richardson_step_matches_ref(backend, dtype_name, size):
    dtype, device, n = case(backend, dtype_name, size)
    gen = generator()
    v, b, hv = (randn(n, dtype, device, gen) for _ in range(3))
    alpha = 0.2 + torch.rand((), generator=gen).item()
    gamma = 0.1 + 2 * torch.rand((), generator=gen).item()

    v_new, upd_sq, vnew_sq = richardson_step(v, b, hv, alpha, gamma, backend=backend)
    ref = richardson_step_ref(v, b, hv, alpha, gamma)
    truth_v = richardson_step_ref(*(x.double() for x in (v, b, hv)), alpha, gamma)[0]
    assert_close_to_truth(v_new, ref[0], truth_v, name="v_new")
    if backend == "cpp":  # same operation order as the reference: identical bits
        assert torch.equal(v_new, ref[0])
    # Norms of the vectors each side actually produced, summed exactly.
    truth_upd = exact_sq_norm(ref[0].double() - v.double())
    truth_new = exact_sq_norm(ref[0])
    if dtype in (torch.float32, torch.float64):
        assert_close_to_truth(upd_sq, ref[1], truth_upd, name="upd_sq", reduction_n=n)
        assert_close_to_truth(vnew_sq, ref[2], truth_new, name="vnew_sq", reduction_n=n)
    else:  # half types: compare with the norms of the fused v_new itself
        assert_close_to_truth(
            upd_sq,
            ref[1],
            exact_sq_norm(v_new.double() - v.double()).float(),
            name="upd_sq",
            reduction_n=n,
        )
        assert_close_to_truth(
            vnew_sq, ref[2], exact_sq_norm(v_new).float(), name="vnew_sq", reduction_n=n
        )
    assert upd_sq.shape == () and vnew_sq.shape == () and v_new.shape == (n,)


@pytest.mark.parametrize("backend", ["auto", "cpp", "torch"])
def test_richardson_iteration_solves_proximal_system(backend):
    """Iterating the op solves (I + gamma H) v = b for an SPD H (fp64, closed-form answer)."""
    if backend == "cpp" and registry.extension()[0] is None:
        pytest.skip(f"C++ kernels unavailable: {registry.extension()[1]}")
    gen = generator()
    n, gamma = 37, 0.5
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eig = torch.rand(n, generator=gen, dtype=torch.float64) * 3
    h = q @ torch.diag(eig) @ q.T
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    alpha = 2 / (2 + gamma * 3)  # |1 - alpha (1 + gamma h)| < 1 for h in [0, 3]
    v = torch.zeros(n, dtype=torch.float64)
    for _ in range(60):
        v_prev = v
        v, upd_sq, vnew_sq = richardson_step(v, b, h @ v, alpha, gamma, backend=backend)
    expected = torch.linalg.solve(torch.eye(n, dtype=torch.float64) + gamma * h, b)
    torch.testing.assert_close(v, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(upd_sq, ((v - v_prev) ** 2).sum(), rtol=1e-12, atol=1e-30)
    torch.testing.assert_close(vnew_sq, (v**2).sum(), rtol=1e-12, atol=0)


def test_richardson_step_grad_goes_through_ref():
    """Inputs that require grad: auto picks the differentiable reference, named kernels refuse."""
    v, b, hv = (torch.randn(9, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert registry.select_backend("richardson_step", "auto", v, b, hv) == "torch"
    v_new, upd_sq, _ = richardson_step(v, b, hv, 0.5, 2.0)
    (v_new.sum() + upd_sq).backward()
    # d/db [sum(v + a (b - v - g hv)) + a^2 ||b - v - g hv||^2] = a + 2 a^2 r
    r = (b - v - 2.0 * hv).detach()
    torch.testing.assert_close(b.grad, 0.5 + 2 * 0.25 * r)
    with pytest.raises(registry.UnsupportedBackendError, match="requires grad"):
        richardson_step(v, b, hv, 0.5, 2.0, backend="cpp")


def test_richardson_step_rejects_mismatched_buffers():
    v = torch.zeros(5)
    with pytest.raises(ValueError, match="hv is"):
        richardson_step(v, v, torch.zeros(6), 1.0, 1.0)
    with pytest.raises(ValueError, match="b is"):
        richardson_step(v, v.double(), v, 1.0, 1.0)


@pytest.mark.parametrize("backend", ["cpp", "torch", "cuda", "triton"])
def test_richardson_step_writes_into_out(backend):
    device = device_for(backend, torch.float32)
    gen = generator()
    v, b, hv = (randn(1001, torch.float32, device, gen) for _ in range(3))
    out = torch.empty_like(v)
    v_new, upd_sq, vnew_sq = richardson_step(v, b, hv, 0.7, 1.1, backend=backend, out=out)
    assert v_new.data_ptr() == out.data_ptr()
    expected = richardson_step(v, b, hv, 0.7, 1.1, backend=backend)
    assert (
        torch.equal(v_new, expected[0])
        and torch.equal(upd_sq, expected[1])
        and torch.equal(vnew_sq, expected[2])
    )
    with pytest.raises(ValueError, match="overlaps"):
        richardson_step(v, b, hv, 0.7, 1.1, backend=backend, out=v)
