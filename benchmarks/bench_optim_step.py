"""sgd_step / adam_step per backend vs the references (the torch.optim chains): time, GB/s, peak
memory (see conftest.py). In place, so there is no allocation variant.

    python -m pytest benchmarks/bench_optim_step.py --benchmark-only -s

SGD (momentum 0.9, weight decay 1e-2) moves param, grad, buffer: 5 buffer passes; Adam
(no weight decay) reads param, grad and both moments and writes three: 7 passes.
"""

import pytest
import torch
from conftest import FUSED_BACKENDS, N, bench_device

from resalign_fast.ops.optim_step import adam_step, adam_step_ref, sgd_step, sgd_step_ref

SGD = dict(lr=1e-3, momentum=0.9, weight_decay=1e-2, first_step=False)
ADAM = dict(step=10, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_sgd_step(benchmark, measure, backend):
    device = bench_device("sgd_step", backend)
    p, g, buf = (torch.randn(N, device=device) for _ in range(3))
    measure(
        lambda: sgd_step(p, g, buf, **SGD, backend=backend),
        lambda: sgd_step_ref(p, g, buf, **SGD),
        device,
        N,
        5 * N * p.element_size(),
    )


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_adam_step(benchmark, measure, backend):
    device = bench_device("adam_step", backend)
    p, g, m = (torch.randn(N, device=device) for _ in range(3))
    v = torch.rand(N, device=device)
    measure(
        lambda: adam_step(p, g, m, v, **ADAM, backend=backend),
        lambda: adam_step_ref(p, g, m, v, **ADAM),
        device,
        N,
        7 * N * p.element_size(),
    )
