"""fd_perturb / fd_combine: every backend against the references, and the HVP of a quadratic."""

import pytest
import torch
from _ops_testing import assert_close_to_truth, case, cases, device_for, generator, randn

from resalign_fast.ops import registry
from resalign_fast.ops.fd_hvp import fd_combine, fd_combine_ref, fd_perturb, fd_perturb_ref

pytestmark = pytest.mark.usefixtures("one_thread")


def _eps(gen) -> float:
    return 10 ** (-4 + 3 * torch.rand((), generator=gen).item())  # 1e-4 .. 1e-1


def _check_matches_ref(fused, reference, names, backend, dtype_name, size):
    """fused(a, b, eps, backend=) against reference(a, b, eps): outputs `names`, from two fresh
    random buffers and a random eps."""
    dtype, device, n = case(backend, dtype_name, size)
    gen = generator()
    a, b = randn(n, dtype, device, gen), randn(n, dtype, device, gen)
    eps = _eps(gen)
    outs = fused(a, b, eps, backend=backend)
    refs = reference(a, b, eps)
    truths = reference(a.double(), b.double(), eps)
    for name, out, r, t in zip(names, outs, refs, truths, strict=True):
        assert_close_to_truth(out, r, t, name=name)
        if backend == "cpp":
            assert torch.equal(out, r), name


@pytest.mark.parametrize("backend,dtype_name,size", cases())
def test_fd_perturb_matches_ref(backend, dtype_name, size):
    _check_matches_ref(fd_perturb, fd_perturb_ref, ("x_plus", "x_minus"), backend, dtype_name, size)


@pytest.mark.parametrize("backend,dtype_name,size", cases())
def test_fd_combine_matches_ref(backend, dtype_name, size):
    def fused(*args, **kw):
        return (fd_combine(*args, **kw),)

    def reference(*args):
        return (fd_combine_ref(*args),)

    _check_matches_ref(fused, reference, ("hv",), backend, dtype_name, size)


@pytest.mark.parametrize("backend", ["auto", "cpp", "torch"])
def test_fd_hvp_of_quadratic_is_exact(backend):
    """For f(x) = x^T A x / 2 the gradient is linear, so the central difference is exact: A v."""
    if backend == "cpp" and registry.extension()[0] is None:
        pytest.skip(f"C++ kernels unavailable: {registry.extension()[1]}")
    gen = generator()
    n = 29
    m = torch.randn(n, n, generator=gen, dtype=torch.float64)
    a = m @ m.T
    x, v = (
        torch.randn(n, generator=gen, dtype=torch.float64),
        torch.randn(n, generator=gen, dtype=torch.float64),
    )
    eps = 1e-3
    x_plus, x_minus = fd_perturb(x, v, eps, backend=backend)
    hv = fd_combine(a @ x_plus, a @ x_minus, eps, backend=backend)
    torch.testing.assert_close(hv, a @ v, rtol=1e-9, atol=1e-9 * (a @ v).abs().max().item())


def test_fd_ops_reject_bad_arguments():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="eps must be > 0"):
        fd_perturb(x, x, 0.0)
    with pytest.raises(ValueError, match="eps must be > 0"):
        fd_combine(x, x, -1.0)
    with pytest.raises(ValueError, match="g_minus is"):
        fd_combine(x, torch.zeros(5), 1e-3)


@pytest.mark.parametrize("backend", ["cpp", "torch", "cuda", "triton"])
def test_fd_ops_write_into_out(backend):
    device = device_for(backend, torch.float64)
    gen = generator()
    x, v = randn(1001, torch.float64, device, gen), randn(1001, torch.float64, device, gen)
    bufs = torch.empty_like(x), torch.empty_like(x)
    plus, minus = fd_perturb(x, v, 1e-3, backend=backend, out=bufs)
    assert plus.data_ptr() == bufs[0].data_ptr() and minus.data_ptr() == bufs[1].data_ptr()
    expected = fd_perturb(x, v, 1e-3, backend=backend)
    assert torch.equal(plus, expected[0]) and torch.equal(minus, expected[1])
    hv_buf = torch.empty_like(x)
    hv = fd_combine(plus, minus, 1e-3, backend=backend, out=hv_buf)
    assert hv.data_ptr() == hv_buf.data_ptr() and torch.equal(
        hv, fd_combine(plus, minus, 1e-3, backend=backend)
    )
    with pytest.raises(ValueError, match="overlaps"):
        fd_perturb(x, v, 1e-3, backend=backend, out=(bufs[0], bufs[0]))
    with pytest.raises(ValueError, match="overlaps"):
        fd_combine(plus, minus, 1e-3, backend=backend, out=minus)
