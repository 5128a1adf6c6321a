"""Triton kernels of resalign_fast.ops.fd_hvp: x +- eps v and (g+ - g-) / (2 eps), one pass each."""

import torch
import triton
import triton.language as tl

from . import BLOCK
from ._common import compute_dtype, div_rn, grid


@triton.jit
def _fd_perturb_kernel(
    x_ptr, v_ptr, plus_ptr, minus_ptr, n, eps: "fp64", COMPUTE: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    t = tl.full([], eps, COMPUTE) * v
    tl.store(plus_ptr + offs, (x + t).to(plus_ptr.dtype.element_ty), mask=mask)
    tl.store(minus_ptr + offs, (x - t).to(minus_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fd_combine_kernel(
    gp_ptr, gm_ptr, hv_ptr, n, two_eps: "fp64", COMPUTE: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    gp = tl.load(gp_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    gm = tl.load(gm_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    hv = div_rn(gp - gm, tl.full([], two_eps, COMPUTE))
    tl.store(hv_ptr + offs, hv.to(hv_ptr.dtype.element_ty), mask=mask)


def fd_perturb_triton(
    x: torch.Tensor,
    v: torch.Tensor,
    eps: float,
    out_plus: torch.Tensor | None = None,
    out_minus: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + eps v, x - eps v) for contiguous (N,) buffers of one dtype, into the out buffers if
    given."""
    plus = torch.empty_like(x) if out_plus is None else out_plus
    minus = torch.empty_like(x) if out_minus is None else out_minus
    if x.numel():
        _fd_perturb_kernel[grid(x.numel(), BLOCK)](
            x,
            v,
            plus,
            minus,
            x.numel(),
            eps,
            COMPUTE=compute_dtype(x.dtype),
            BLOCK=BLOCK,
            enable_fp_fusion=False,
        )
    return plus, minus


def fd_combine_triton(
    g_plus: torch.Tensor, g_minus: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """(g_plus - g_minus) / (2 eps) for contiguous (N,) buffers of one dtype, into `out` if
    given."""
    hv = torch.empty_like(g_plus) if out is None else out
    if g_plus.numel():
        _fd_combine_kernel[grid(g_plus.numel(), BLOCK)](
            g_plus,
            g_minus,
            hv,
            g_plus.numel(),
            2.0 * eps,
            COMPUTE=compute_dtype(g_plus.dtype),
            BLOCK=BLOCK,
            enable_fp_fusion=False,
        )
    return hv
