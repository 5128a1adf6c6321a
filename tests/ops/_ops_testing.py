"""Shared helpers of the fused-op tests: backend parameters, inputs, the tolerance rule.

Tolerance rule (flash-attention's): a fused backend's error against an fp64 "truth" may be at most
twice the error of the plain-torch reference in the same dtype, plus one ulp of the largest truth
value (reductions: plus 8 sqrt(n) fp64 ulps, since the fused kernels accumulate in fp64).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from resalign_fast.ops import registry

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
# Sizes: one element, a tail-only size, and a large odd size that is no multiple of any block
# (1024 Triton, 256 CUDA threads, 32768 CPU chunk). The interpreter gets a smaller odd size.
SIZES = {"1": 1, "7": 7, "large": 1_000_003}
INTERPRETER_LARGE = 4_099

TRITON_CHILD_ENV = "RESALIGN_TEST_TRITON_CHILD"


def cases(backends=registry.STANDARD_BACKENDS):
    """(backend, dtype, size) parameters: fp32/fp64 everywhere, bf16 for the GPU-capable
    backends."""
    out = []
    for backend in backends:
        dtypes = ["float32", "float64"] + (["bfloat16"] if backend in ("cuda", "triton") else [])
        out += [pytest.param(backend, d, s, id=f"{backend}-{d}-{s}") for d in dtypes for s in SIZES]
    return out


def device_for(backend: str, dtype: torch.dtype) -> torch.device:
    """Device a backend test runs on, or pytest.skip with the reason it cannot run here."""
    if backend == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        reasons = registry.extension_reasons("richardson_step_cuda")
        if reasons:
            pytest.fail(
                "a CUDA device is present but the CUDA kernels are missing: " + "; ".join(reasons)
            )
        return torch.device("cuda")
    if backend == "triton":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if dtype in (torch.float16, torch.bfloat16):
            pytest.skip(
                "fp16/bf16 Triton kernels run on GPUs only (the interpreter computes in numpy)"
            )
        return torch.device("cpu")
    if backend == "cpp" and registry.extension()[0] is None:
        pytest.skip(f"C++ kernels unavailable: {registry.extension()[1]}")
    if dtype in (torch.float16, torch.bfloat16) and backend in ("cpp", "torch"):
        pytest.skip("CPU kernels are fp32/fp64")
    return torch.device("cpu")


def size_for(backend: str, device: torch.device, size: str, large: int = SIZES["large"]) -> int:
    """The element count of a size id (smaller 'large' under the Triton interpreter)."""
    if size != "large":
        return SIZES[size]
    return INTERPRETER_LARGE if backend == "triton" and device.type == "cpu" else large


def case(backend: str, dtype_name: str, size: str, large: int = SIZES["large"]):
    """(dtype, device, element count) of one `cases()` parameter set; pytest.skip where the backend
    cannot run here. (CPU Triton cases without the interpreter never get here: conftest.py.)"""
    dtype = DTYPES[dtype_name]
    device = device_for(backend, dtype)
    return dtype, device, size_for(backend, device, size, large)


def needs_triton_child(backend: str, device: torch.device) -> bool:
    """True when a CPU Triton case must run in a child process with TRITON_INTERPRET=1."""
    if backend != "triton" or device.type != "cpu":
        return False
    pytest.importorskip("triton", reason="triton is not installed")
    return not registry.interpreter_active()


def randn(
    n: int, dtype: torch.dtype, device: torch.device, gen: torch.Generator, scale: float = 1.0
) -> torch.Tensor:
    """Fresh standard-normal buffer, drawn in fp64 on the CPU from `gen` then converted."""
    return (torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(
        device=device, dtype=dtype
    )


def generator() -> torch.Generator:
    """A generator with a fresh seed per call; the seed is printed (pytest shows it on failure)."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    return torch.Generator().manual_seed(seed)


def ulp(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def assert_close_to_truth(
    out: torch.Tensor,
    ref: torch.Tensor,
    truth: torch.Tensor,
    *,
    name: str,
    reduction_n: int | None = None,
) -> None:
    """The tolerance rule of this module (see the docstring).

    Args:
        out: fused backend output.
        ref: reference output in the same dtype.
        truth: the reference evaluated in fp64 (or an exact value).
        name: output name for the message.
        reduction_n: number of summed terms when `out` is a reduction.
    """
    assert out.shape == ref.shape == truth.shape, (name, out.shape, ref.shape, truth.shape)
    assert out.dtype == ref.dtype, (name, out.dtype, ref.dtype)
    o, r, t = (x.detach().double().cpu() for x in (out, ref, truth))
    err_out = (o - t).abs().max().item() if t.numel() else 0.0
    err_ref = (r - t).abs().max().item() if t.numel() else 0.0
    scale = t.abs().max().item() if t.numel() else 0.0
    slack = ulp(out.dtype) * scale
    if reduction_n is not None:
        slack += 8 * math.sqrt(reduction_n) * ulp(torch.float64) * scale
    assert err_out <= 2 * err_ref + slack, (
        f"{name}: fused error {err_out:.3e} > 2 x reference error {err_ref:.3e} + {slack:.3e}"
    )


def exact_sq_norm(x: torch.Tensor) -> torch.Tensor:
    """||x||^2 of an fp32/fp64 vector, summed exactly (math.fsum) over fp64 squares."""
    xs = x.detach().double().cpu()
    return torch.tensor(math.fsum((xs * xs).tolist()), dtype=torch.float64)
