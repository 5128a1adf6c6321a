"""sgd_step / adam_step: every backend against the references and against torch.optim itself.

Tolerance against torch.optim, one step at a time: cpp bit for bit (fp32 and fp64); cuda and
triton per element 2 ulp of (|value after| + |value before|), the scale of the rounding of the
update itself (see resalign_fast/ops/optim_step.py for why they cannot be exact).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _ops_testing import (
    DTYPES,
    assert_close_to_truth,
    case,
    cases,
    device_for,
    generator,
    randn,
    size_for,
)

from resalign_fast.ops import registry
from resalign_fast.ops.optim_step import adam_step, adam_step_ref, sgd_step, sgd_step_ref

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 3
# 'large' here: 4 CPU chunks of 32768 and an odd tail; the torch.optim chains are slow at 1M.
LARGE = 100_003
SGD_CONFIGS = [
    dict(lr=0.1, momentum=0.0, weight_decay=0.0),
    dict(lr=0.05, momentum=0.9, weight_decay=0.01),
]
ADAM_CONFIGS = [
    dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False),
    dict(
        lr=1e-2, beta1=0.3, beta2=0.99, eps=1e-6, weight_decay=0.1, decoupled=False
    ),  # lerp weight > 0.5
    dict(lr=2e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, decoupled=True),  # AdamW
]


def _check_steps_match_ref(fused, reference, names, backend, dtype_name, size):
    """STEPS steps of fused(state, g, step, backend=) against reference(state, g, step), one step
    at a time from the same state: param (fresh random), then zero-initialised buffers."""
    dtype, device, n = case(backend, dtype_name, size, LARGE)
    gen = generator()
    zeros = [torch.zeros(n, dtype=dtype, device=device) for _ in names[1:]]
    state = [randn(n, dtype, device, gen), *zeros]
    for step in range(1, STEPS + 1):
        g = randn(n, dtype, device, gen)
        state_ref = [x.clone() for x in state]
        state_64 = [x.to(torch.float64, copy=True) for x in state]
        fused(state, g, step, backend=backend)
        reference(state_ref, g, step)
        reference(state_64, g.double(), step)
        for name, out, r, t in zip(names, state, state_ref, state_64, strict=True):
            assert_close_to_truth(out, r, t, name=f"{name}, step {step}")
            if backend == "cpp":
                assert torch.equal(out, r), name


@pytest.mark.parametrize("cfg", SGD_CONFIGS, ids=["plain", "momentum_wd"])
@pytest.mark.parametrize("backend,dtype_name,size", cases())
def test_sgd_step_matches_ref(backend, dtype_name, size, cfg):
    def run(step_fn):
        return lambda s, g, step, **kw: step_fn(s[0], g, s[1], **cfg, first_step=step == 1, **kw)

    _check_steps_match_ref(
        run(sgd_step), run(sgd_step_ref), ("param", "momentum_buf"), backend, dtype_name, size
    )


@pytest.mark.parametrize("cfg", ADAM_CONFIGS, ids=["adam", "adam_l2_bigweight", "adamw"])
@pytest.mark.parametrize("backend,dtype_name,size", cases())
def test_adam_step_matches_ref(backend, dtype_name, size, cfg):
    def run(step_fn):
        return lambda s, g, step, **kw: step_fn(s[0], g, s[1], s[2], step=step, **cfg, **kw)

    _check_steps_match_ref(
        run(adam_step),
        run(adam_step_ref),
        ("param", "exp_avg", "exp_avg_sq"),
        backend,
        dtype_name,
        size,
    )


def _torch_optim_tolerance(
    backend: str, got: torch.Tensor, want: torch.Tensor, before: torch.Tensor
) -> None:
    if backend in ("cpp", "torch"):
        assert torch.equal(got, want), (got - want).abs().max().item()
    else:
        bound = 2 * torch.finfo(want.dtype).eps * (want.abs() + before.abs())
        assert bool(((got - want).abs() <= bound).all()), ((got - want).abs() - bound).max().item()


@pytest.mark.parametrize("backend", ["cpp", "torch", "cuda", "triton"])
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_optim_steps_match_torch_optim(backend, dtype_name):
    """Trajectories of SGD, Adam, AdamW next to torch.optim (foreach=False, fused=False)."""
    dtype = DTYPES[dtype_name]
    device = device_for(backend, dtype)
    n = size_for(backend, device, "large", LARGE)
    gen = generator()
    for cfg in SGD_CONFIGS:
        p0 = randn(n, dtype, device, gen)
        p_torch, p, buf = p0.clone().requires_grad_(), p0.clone(), torch.zeros_like(p0)
        opt = torch.optim.SGD([p_torch], **cfg, foreach=False)
        for step in range(STEPS):
            g = randn(n, dtype, device, gen)
            p_torch.grad = g.clone()
            before = p.clone()
            opt.step()
            sgd_step(p, g, buf, **cfg, first_step=step == 0, backend=backend)
            _torch_optim_tolerance(backend, p, p_torch.detach(), before)
            p.copy_(p_torch.detach())  # one step at a time
    for cfg in ADAM_CONFIGS:
        p0 = randn(n, dtype, device, gen)
        p_torch, p = p0.clone().requires_grad_(), p0.clone()
        m, v = torch.zeros_like(p0), torch.zeros_like(p0)
        cls = torch.optim.AdamW if cfg["decoupled"] else torch.optim.Adam
        opt = cls(
            [p_torch],
            lr=cfg["lr"],
            betas=(cfg["beta1"], cfg["beta2"]),
            eps=cfg["eps"],
            weight_decay=cfg["weight_decay"],
            foreach=False,
        )
        for step in range(1, STEPS + 1):
            g = randn(n, dtype, device, gen)
            p_torch.grad = g.clone()
            befores = [x.clone() for x in (p, m, v)]
            opt.step()
            adam_step(p, g, m, v, step=step, **cfg, backend=backend)
            state = opt.state[p_torch]
            for got, want, before in zip(
                (p, m, v), (p_torch.detach(), state["exp_avg"], state["exp_avg_sq"]), befores
            ):
                _torch_optim_tolerance(backend, got, want, before)
                got.copy_(want)


def test_cpp_steps_match_torch_optim_without_fma_kernels():
    """Under ATEN_CPU_CAPABILITY=default torch does not fuse multiply-adds; the C++ kernels
    follow."""
    if registry.extension()[0] is None:
        pytest.skip(f"C++ kernels unavailable: {registry.extension()[1]}")
    code = (
        "import torch\n"
        "from resalign_fast.ops.optim_step import torch_cpu_fuses_multiply_add\n"
        "assert torch.backends.cpu.get_cpu_capability() == 'DEFAULT'\n"
        "torch.set_num_threads(1)\n"
        "assert not torch_cpu_fuses_multiply_add()\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = dict(
        os.environ,
        ATEN_CPU_CAPABILITY="default",
        PYTHONPATH=f"{root}{os.pathsep}{Path(__file__).parent}",
    )
    cmd = [
        sys.executable,
        "-c",
        code + "import test_optim_step as t\n"
        "for d in ('float32', 'float64'):\n"
        "    t.test_optim_steps_match_torch_optim('cpp', d)\n",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_optim_steps_validate_and_bump_versions():
    p, g = torch.zeros(6), torch.ones(6)
    with pytest.raises(ValueError, match="needs a momentum_buf"):
        sgd_step(p, g, None, lr=0.1, momentum=0.9, weight_decay=0.0, first_step=True)
    with pytest.raises(ValueError, match="step must be an integer >= 1"):
        adam_step(
            p,
            g,
            p.clone(),
            p.clone(),
            step=0,
            lr=1e-3,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            decoupled=False,
        )
    with pytest.raises(ValueError, match="betas"):
        adam_step(
            p,
            g,
            p.clone(),
            p.clone(),
            step=1,
            lr=1e-3,
            beta1=1.0,
            beta2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            decoupled=False,
        )
    with pytest.raises(ValueError, match="exp_avg_sq is"):
        adam_step(
            p,
            g,
            p.clone(),
            torch.zeros(7),
            step=1,
            lr=1e-3,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            decoupled=False,
        )
    # In-place kernels tell autograd that the tensors changed, as torch's in-place ops do.
    for backend in ["cpp"] if registry.extension()[0] is not None else []:
        buf = torch.zeros(6)
        before = p._version, buf._version
        sgd_step(
            p, g, buf, lr=0.1, momentum=0.9, weight_decay=0.0, first_step=True, backend=backend
        )
        assert p._version > before[0] and buf._version > before[1]
        torch.testing.assert_close(p, torch.full((6,), -0.1))
