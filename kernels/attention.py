"""Flash-style attention in Triton (online softmax, O(N) memory), differentiable at every order.

Kernels -> launchers (`attention_fwd_triton`, `attention_bwd_triton`); resalign_fast.ops.attention
wraps the launchers in an `AttentionImpl` for its autograd Functions (this file imports only torch
and triton):

* `_fwd_kernel`: one program per (query block, batch*head); streams key/value blocks with an online
  softmax and writes out and the row logsumexp (fp32).
* `_bwd_kernel`, launched twice: DKDV=True, one program per (key block, batch*head) that streams
  the query blocks for dK and dV; DKDV=False, one program per query block, for dQ. Both recompute
  the probabilities from the logsumexp (`_probs_and_dscores`). Two launches instead of atomics
  keep the backward deterministic.

Only the first order runs here. The double backward and forward-mode AD (HVPs) go through the
chunked recomputation of `resalign_fast.ops.attention`, so they need no (N, N) matrix either.
Supported: (B, H, N, D) fp16/bf16/fp32 with D <= 256 (SD v1.4 uses 40, 80, 160), any lengths,
no mask. fp32 matmuls run in IEEE fp32 (no TF32), which is slow: on an H200 (B=2, H=8, N=4096,
D=40) forward+backward took 149 ms in fp32 against 2.3 ms in bf16 (sdpa: 7.2 / 1.0 ms), so the
dispatcher picks these kernels for fp16/bf16 only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256


def _config(d: int, dtype: torch.dtype) -> dict:
    """Block sizes: few large programs in the interpreter (about 1.8 ms per program on CPU); on GPU
    64 x 64 tiles, or 32 x 32 when a (64, BLOCK_D) fp32 tile would crowd shared memory."""
    block_d = max(16, triton.next_power_of_2(d))
    if INTERPRETED:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=block_d)
    small = block_d * (4 if dtype == torch.float32 else 2) > 256
    block = 32 if small else 64
    return dict(BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d, num_warps=4)


# Only Triton builtins and this module's own jit functions are used inside the kernels: the
# interpreter cannot run triton.language's jit helpers (tl.zeros, tl.sum, tl.max) when triton was
# imported before TRITON_INTERPRET=1 was set (torch imports triton lazily, e.g. for torch.func).
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _load(ptr, rows, n_rows, stride_n, cols, n_cols, stride_d):
    """(len(rows), len(cols)) tile of a row-major (n_rows, n_cols) slice; zeros outside it."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * stride_n + cols[None, :] * stride_d, mask=mask, other=0.0)


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    sqb,
    sqh,
    sqn,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    sob,
    soh,
    son,
    sod,
    H,
    NQ,
    NK,
    D,
    qk_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
):
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    cols0 = tl.arange(0, BLOCK_N)
    q = _load(Q + b * sqb + h * sqh, rows, NQ, sqn, dims, D, sqd)
    K += b * skb + h * skh
    V += b * svb + h * svh
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.full((BLOCK_M,), 0.0, tl.float32)
    acc = tl.full((BLOCK_M, BLOCK_D), 0.0, tl.float32)
    for start in range(0, NK, BLOCK_N):
        cols = start + cols0
        k = _load(K, cols, NK, skn, dims, D, skd)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # log2 units
        s = tl.where(cols[None, :] < NK, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _max))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, _add)
        v = _load(V, cols, NK, svn, dims, D, svd)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    acc = acc / l_i[:, None]
    o_ptr = O + b * sob + h * soh + rows[:, None] * son + dims[None, :] * sod
    tl.store(o_ptr, acc.to(O.dtype.element_ty), mask=(rows[:, None] < NQ) & (dims[None, :] < D))
    tl.store(LSE + bh * NQ + rows, (m_i + tl.log2(l_i)) / 1.4426950408889634, mask=rows < NQ)


@triton.jit
def _row_stats(LSE, DELTA, bh, rows, NQ):
    """Saved logsumexp and delta = rowsum(dO * O) of query rows `rows` (zeros outside)."""
    lse = tl.load(LSE + bh * NQ + rows, mask=rows < NQ, other=0.0)
    delta = tl.load(DELTA + bh * NQ + rows, mask=rows < NQ, other=0.0)
    return lse, delta


@triton.jit
def _probs_and_dscores(q, k, v, do, lse, delta, rows, NQ, cols, NK, scale, PREC: tl.constexpr):
    """The backward's tile: probabilities P recomputed from the logsumexp (zero outside the
    (NQ, NK) range) and dS = P * (dO V^T - delta), without the score scale."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    p = tl.exp2((s * scale - lse[:, None]) * 1.4426950408889634)
    p = tl.where((rows[:, None] < NQ) & (cols[None, :] < NK), p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    return p, p * (dp - delta[:, None])


@triton.jit
def _bwd_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    DK,
    DV,
    sqb,
    sqh,
    sqn,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    sdb,
    sdh,
    sdn,
    sdd,
    H,
    NQ,
    NK,
    D,
    scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
    DKDV: tl.constexpr,
):
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    dims = tl.arange(0, BLOCK_D)
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    DO += b * sdb + h * sdh
    if DKDV:  # dK, dV of one key block, streaming the query blocks
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k = _load(K, cols, NK, skn, dims, D, skd)
        v = _load(V, cols, NK, svn, dims, D, svd)
        dk = tl.full((BLOCK_N, BLOCK_D), 0.0, tl.float32)
        dv = tl.full((BLOCK_N, BLOCK_D), 0.0, tl.float32)
        for start in range(0, NQ, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            q = _load(Q, rows, NQ, sqn, dims, D, sqd)
            do = _load(DO, rows, NQ, sdn, dims, D, sdd)
            lse, delta = _row_stats(LSE, DELTA, bh, rows, NQ)
            p, ds = _probs_and_dscores(q, k, v, do, lse, delta, rows, NQ, cols, NK, scale, PREC)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
        mask = (cols[:, None] < NK) & (dims[None, :] < D)
        offs = b * skb + h * skh + cols[:, None] * skn + dims[None, :] * skd  # DK, DV: k's layout
        tl.store(DK + offs, (dk * scale).to(DK.dtype.element_ty), mask=mask)
        tl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=mask)
    else:  # dQ of one query block, streaming the key blocks
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        q = _load(Q, rows, NQ, sqn, dims, D, sqd)
        do = _load(DO, rows, NQ, sdn, dims, D, sdd)
        lse, delta = _row_stats(LSE, DELTA, bh, rows, NQ)
        dq = tl.full((BLOCK_M, BLOCK_D), 0.0, tl.float32)
        for start in range(0, NK, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            k = _load(K, cols, NK, skn, dims, D, skd)
            v = _load(V, cols, NK, svn, dims, D, svd)
            _, ds = _probs_and_dscores(q, k, v, do, lse, delta, rows, NQ, cols, NK, scale, PREC)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        mask = (rows[:, None] < NQ) & (dims[None, :] < D)
        offs = b * sqb + h * sqh + rows[:, None] * sqn + dims[None, :] * sqd  # DQ: q's layout
        tl.store(DQ + offs, (dq * scale).to(DQ.dtype.element_ty), mask=mask)


# Triton decides at decoration (this module's import) whether kernels run in its CPU interpreter.
INTERPRETED = type(_fwd_kernel).__name__ == "InterpretedFunction"


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for fp16/bf16 inputs


def attention_fwd_triton(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Forward launcher.

    Args:
        q: (B, H, Nq, D); k, v: (B, H, Nk, D); fp16/bf16/fp32, any strides.
        scale: score scale.

    Returns:
        out (B, H, Nq, D) in q's dtype, lse (B, H, Nq) fp32 (natural log).
    """
    bsz, heads, nq, d = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(bsz, heads, nq, dtype=torch.float32, device=q.device)
    cfg = _config(d, q.dtype)
    grid = (triton.cdiv(nq, cfg["BLOCK_M"]), bsz * heads)
    _fwd_kernel[grid](
        q,
        k,
        v,
        out,
        lse,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        heads,
        nq,
        k.shape[2],
        d,
        scale * LOG2E,
        PREC=_prec(q.dtype),
        **cfg,
    )
    return out, lse


def attention_bwd_triton(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward launcher: gradients of <dout, attention(q, k, v)>.

    Args:
        q: (B, H, Nq, D); k, v: (B, H, Nk, D); out, dout: (B, H, Nq, D); lse: (B, H, Nq) fp32.
        scale: score scale.

    Returns:
        dq (B, H, Nq, D), dk, dv (B, H, Nk, D), contiguous, in the inputs' dtypes.
    """
    bsz, heads, nq, d = q.shape
    nk = k.shape[2]
    delta = (dout.float() * out.float()).sum(-1).contiguous()  # (B, H, Nq): rowsum(dP * P)
    lse = lse.contiguous()
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(k.shape, dtype=v.dtype, device=v.device)
    q, k, v = (x.contiguous() for x in (q, k, v))  # DQ/DK/DV are written with q's and k's strides
    cfg = _config(d, q.dtype)
    args = (
        q,
        k,
        v,
        dout,
        lse,
        delta,
        dq,
        dk,
        dv,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *dout.stride(),
        heads,
        nq,
        nk,
        d,
        scale,
    )
    key_blocks, query_blocks = triton.cdiv(nk, cfg["BLOCK_N"]), triton.cdiv(nq, cfg["BLOCK_M"])
    for dkdv, programs in ((True, key_blocks), (False, query_blocks)):  # dK and dV first, then dQ
        _bwd_kernel[(programs, bsz * heads)](*args, PREC=_prec(q.dtype), DKDV=dkdv, **cfg)
    return dq, dk, dv


def not_supported_reasons(
    backend: str, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None
) -> list[str]:
    """Why these kernels cannot run the inputs (empty: they can), with the signature of every
    `not_supported_reasons` in resalign_fast; their one backend is "triton".

    Only what these kernels themselves support is checked: how triton decorated them (INTERPRETED),
    rank, dtypes, head dim, mask. The environment (TRITON_INTERPRET, the package) is checked by
    resalign_fast.ops.attention before it imports this module.
    """
    if backend != "triton":
        return [f"resalign_fast.kernels.attention runs only the backend 'triton', not {backend!r}"]
    reasons = []
    if not q.is_cuda and not INTERPRETED:
        reasons.append(
            f"triton: tensors are on {q.device.type}; CPU tensors need "
            "TRITON_INTERPRET=1 set before resalign_fast.kernels.attention is imported"
        )
    if q.dim() != 4:
        reasons.append(f"triton: needs (B, H, N, D) tensors, got rank {q.dim()}")
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in dtypes:
        reasons.append(
            f"triton: needs one dtype among fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if q.shape[-1] != v.shape[-1] or q.shape[-1] > MAX_HEAD_DIM:
        reasons.append(
            f"triton: needs head dim D == Dv <= {MAX_HEAD_DIM}, got {q.shape[-1]}, {v.shape[-1]}"
        )
    if attn_mask is not None:
        reasons.append("triton: no attention mask support")
    return reasons
