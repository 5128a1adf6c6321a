"""Triton kernels of resalign_fast.ops.optim_step: fused in-place SGD and Adam/AdamW steps.

Same arithmetic as csrc/fused_math.h with multiply-adds fused (tl.fma), IEEE sqrt and division;
fp16/bf16 buffers compute in fp32.
"""

import torch
import triton
import triton.language as tl

from . import BLOCK
from ._common import compute_dtype, div_rn, grid, sqrt_rn


@triton.jit
def _sgd_kernel(
    p_ptr,
    g_ptr,
    buf_ptr,
    n,
    neg_lr: "fp64",
    momentum: "fp64",
    weight_decay: "fp64",
    HAS_WD: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    FIRST: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    if HAS_WD:
        g = tl.fma(tl.full([], weight_decay, COMPUTE), p, g)
    if HAS_MOMENTUM:
        if not FIRST:
            buf = tl.load(buf_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
            g = buf * tl.full([], momentum, COMPUTE) + g
        tl.store(buf_ptr + offs, g.to(buf_ptr.dtype.element_ty), mask=mask)
    p = tl.fma(tl.full([], neg_lr, COMPUTE), g, p)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adam_kernel(
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    n,
    lerp_weight: "fp64",
    beta2: "fp64",
    one_minus_beta2: "fp64",
    eps: "fp64",
    weight_decay: "fp64",
    decay: "fp64",
    neg_step_size: "fp64",
    bc2_sqrt: "fp64",
    HAS_WD: tl.constexpr,
    DECOUPLED: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    if HAS_WD:
        if DECOUPLED:
            p = p * tl.full([], decay, COMPUTE)
        else:
            g = tl.fma(tl.full([], weight_decay, COMPUTE), p, g)
    w = tl.full([], lerp_weight, COMPUTE)
    diff = g - m
    if (
        w < 0.5
    ):  # torch's lerp: start + w (end - start) for small w, else end + (w - 1) (end - start)
        m = tl.fma(w, diff, m)
    else:
        m = tl.fma(w - 1.0, diff, g)
    v = tl.fma(tl.full([], one_minus_beta2, COMPUTE) * g, g, v * tl.full([], beta2, COMPUTE))
    denom = div_rn(sqrt_rn(v), tl.full([], bc2_sqrt, COMPUTE)) + tl.full([], eps, COMPUTE)
    p = p + div_rn(tl.full([], neg_step_size, COMPUTE) * m, denom)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)


def sgd_step_triton(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buf,
    lr: float,
    momentum: float,
    weight_decay: float,
    first_step: bool,
) -> None:
    """In-place SGD step on contiguous (N,) buffers (momentum_buf may be None when momentum ==
    0)."""
    n = param.numel()
    if n == 0:
        return
    has_momentum = momentum != 0.0
    _sgd_kernel[grid(n, BLOCK)](
        param,
        grad,
        momentum_buf if has_momentum else param,
        n,
        -lr,
        momentum,
        weight_decay,
        HAS_WD=weight_decay != 0.0,
        HAS_MOMENTUM=has_momentum,
        FIRST=bool(first_step),
        COMPUTE=compute_dtype(param.dtype),
        BLOCK=BLOCK,
        enable_fp_fusion=False,
    )


def adam_step_triton(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    step_size: float,
    bc2_sqrt: float,
) -> None:
    """In-place Adam/AdamW step on contiguous (N,) buffers; step_size and bc2_sqrt as
    torch.optim."""
    n = param.numel()
    if n == 0:
        return
    _adam_kernel[grid(n, BLOCK)](
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        n,
        1.0 - beta1,
        beta2,
        1.0 - beta2,
        eps,
        weight_decay,
        1.0 - lr * weight_decay,
        -step_size,
        bc2_sqrt,
        HAS_WD=weight_decay != 0.0,
        DECOUPLED=bool(decoupled),
        COMPUTE=compute_dtype(param.dtype),
        BLOCK=BLOCK,
        enable_fp_fusion=False,
    )
