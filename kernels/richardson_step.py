"""Triton kernel of resalign_fast.ops.richardson_step: v_new and both squared norms, one pass.

Each program writes its fp64 partial sums; torch adds the partials in a fixed order.
"""

import torch
import triton
import triton.language as tl

from . import BLOCK
from ._common import compute_dtype, grid


@triton.jit
def _richardson_kernel(
    v_ptr,
    b_ptr,
    hv_ptr,
    out_ptr,
    parts_ptr,
    n,
    alpha: "fp64",
    gamma: "fp64",
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    hv = tl.load(hv_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    a = tl.full([], alpha, COMPUTE)
    g = tl.full([], gamma, COMPUTE)
    vn = (v + a * ((b - v) - g * hv)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, vn, mask=mask)
    vn = vn.to(COMPUTE)
    d = (vn - v).to(tl.float64)
    vn64 = vn.to(tl.float64)
    tl.store(parts_ptr + pid, tl.sum(d * d, axis=0))
    tl.store(parts_ptr + tl.num_programs(0) + pid, tl.sum(vn64 * vn64, axis=0))


def richardson_step_triton(
    v: torch.Tensor,
    b: torch.Tensor,
    hv: torch.Tensor,
    alpha: float,
    gamma: float,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """v_new (N,), ||v_new - v||^2 (), ||v_new||^2 () for contiguous (N,) buffers of one dtype;
    v_new goes to `out` when given."""
    n = v.numel()
    out = torch.empty_like(v) if out is None else out
    (programs,) = grid(n, BLOCK)
    parts = torch.empty(2 * programs, dtype=torch.float64, device=v.device)
    _richardson_kernel[(programs,)](
        v,
        b,
        hv,
        out,
        parts,
        n,
        alpha,
        gamma,
        COMPUTE=compute_dtype(v.dtype),
        BLOCK=BLOCK,
        enable_fp_fusion=False,
    )
    acc = torch.float32 if v.dtype in (torch.float16, torch.bfloat16) else v.dtype
    norms = parts.view(2, programs).sum(dim=1).to(acc)
    return out, norms[0], norms[1]
