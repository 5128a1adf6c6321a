"""richardson_step per backend vs richardson_step_ref: time, GB/s, peak memory (see conftest.py).

    python -m pytest benchmarks/bench_richardson_step.py --benchmark-only -s

"alloc": a new v_new each call (what a plain call does); "out": v_new into a reused buffer (the
reference then also writes into it). The fused op reads 3 buffers and writes 1.
"""

import pytest
import torch
from conftest import FUSED_BACKENDS, N, bench_device

from resalign_fast.ops.richardson_step import richardson_step, richardson_step_ref


@pytest.mark.parametrize("buffers", ["alloc", "out"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_richardson_step(benchmark, measure, backend, buffers):
    device = bench_device("richardson_step", backend)
    v, b, hv = (torch.randn(N, device=device) for _ in range(3))
    out = torch.empty_like(v) if buffers == "out" else None
    measure(
        lambda: richardson_step(v, b, hv, 0.7, 1.0, backend=backend, out=out),
        lambda: richardson_step_ref(v, b, hv, 0.7, 1.0, out=out),
        device,
        N,
        4 * N * v.element_size(),
    )
