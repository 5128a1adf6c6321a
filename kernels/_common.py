"""Helpers shared by the Triton kernels: compute dtype and IEEE-rounded sqrt / division."""

import torch
import triton
import triton.language as tl


def compute_dtype(dtype: torch.dtype):
    """Triton dtype the kernels compute in: fp64 for fp64 buffers, fp32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def grid(n: int, block: int) -> tuple[int]:
    """One program per `block` elements (at least one)."""
    return (max(1, triton.cdiv(n, block)),)


@triton.jit
def sqrt_rn(x):
    """Correctly rounded square root (tl.sqrt is approximate in fp32)."""
    if x.dtype == tl.float32:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@triton.jit
def div_rn(x, y):
    """Correctly rounded division (`/` is approximate in fp32)."""
    if x.dtype == tl.float32:
        return tl.div_rn(x, y)
    else:
        return x / y
