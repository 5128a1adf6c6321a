"""fd_perturb / fd_combine per backend vs the references: time, GB/s, peak memory (conftest.py).

    python -m pytest benchmarks/bench_fd_hvp.py --benchmark-only -s

"alloc": new outputs each call; "out": outputs into reused buffers (the references as well).
fd_perturb reads 2 buffers and writes 2; fd_combine reads 2 and writes 1.
"""

import pytest
import torch
from conftest import FUSED_BACKENDS, N, bench_device

from resalign_fast.ops.fd_hvp import fd_combine, fd_combine_ref, fd_perturb, fd_perturb_ref


@pytest.mark.parametrize("buffers", ["alloc", "out"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_fd_perturb(benchmark, measure, backend, buffers):
    device = bench_device("fd_perturb", backend)
    x, v = torch.randn(N, device=device), torch.randn(N, device=device)
    out = (torch.empty_like(x), torch.empty_like(x)) if buffers == "out" else None
    measure(
        lambda: fd_perturb(x, v, 1e-3, backend=backend, out=out),
        lambda: fd_perturb_ref(x, v, 1e-3, out=out),
        device,
        N,
        4 * N * x.element_size(),
    )


@pytest.mark.parametrize("buffers", ["alloc", "out"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_fd_combine(benchmark, measure, backend, buffers):
    device = bench_device("fd_combine", backend)
    g_plus, g_minus = torch.randn(N, device=device), torch.randn(N, device=device)
    out = torch.empty_like(g_plus) if buffers == "out" else None
    measure(
        lambda: fd_combine(g_plus, g_minus, 1e-3, backend=backend, out=out),
        lambda: fd_combine_ref(g_plus, g_minus, 1e-3, out=out),
        device,
        N,
        3 * N * g_plus.element_size(),
    )
