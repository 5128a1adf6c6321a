"""Chunked exact attention: autograd memory O(N * chunk) at every order of differentiation.

PyTorch's fused attention kernels (flash, memory-efficient, the CPU flash kernel) implement neither
double backward nor forward-mode AD, and plain math attention keeps every (Nq, Nk) probability
matrix alive for the backward, and then again for the double backward of a Hessian-vector product.

`chunked_attention` is exact attention built from two custom autograd Functions:

* `_Attention` (q, k, v) -> out: forward query chunk by query chunk, saving only q, k, v, out and
  the row logsumexp; its `jvp` rule (forward-mode) is also computed chunk by chunk.
* `_AttentionBackward` (q, k, v, dout) -> (dq, dk, dv): the backward of `_Attention`, again a
  Function that saves only its (N, D) inputs. Its own backward (double backward, for HVPs by
  reverse-over-reverse) and its `jvp` (forward-over-reverse HVPs, `torch.func.jvp` of a gradient)
  recompute each query chunk's probabilities and differentiate through that chunk alone.

No order ever holds more than one (chunk, Nk) score block per head. The first-order kernels are
pluggable (`AttentionImpl`): the Triton ones (resalign_fast.kernels.attention) reuse these
higher-order rules. resalign_fast.ops.attention is the op around this (its "chunked" backend).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# Query rows per chunk. Measured on an H200 (fp32, B=2, H=8, N=4096, D=40, one HVP by double
# backward, benchmarks/gpu_attention.py): chunk 256: 78 ms, 717 MiB; 1024: 59 ms, 2201 MiB;
# 4096 (one chunk): 56 ms, 8312 MiB; attention_ref: 32 ms, 11335 MiB.
DEFAULT_CHUNK = 1024


@dataclass(frozen=True)
class AttentionImpl:
    """First-order kernels behind `_Attention`; higher orders always use the chunked recomputation.

    Attributes:
        forward: (q, k, v, mask, scale, chunk) -> (out (..., Nq, Dv), lse (..., Nq) fp32/fp64).
        backward: (q, k, v, out, lse, dout, mask, scale, chunk) -> (dq, dk, dv).
    """

    forward: Callable[..., tuple[Tensor, Tensor]]
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]]


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Boolean keep-mask (True = attend, as in SDPA) -> additive mask; float masks pass through."""
    if mask.dtype == torch.bool:
        zeros = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        return zeros.masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16 scores and softmax statistics are kept in fp32, fp32/fp64 in their own dtype."""
    return torch.promote_types(dtype, torch.float32)


def _rows(x: Tensor | None, start: int, stop: int) -> Tensor | None:
    """Query rows [start, stop) of a (..., Nq, *) tensor; masks broadcast over Nq pass whole."""
    if x is None or x.shape[-2] == 1:
        return x
    return x[..., start:stop, :]


def _scores(q: Tensor, k: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """(..., n, D), (..., Nk, D) -> scale * q k^T + mask, (..., n, Nk) in the accumulation dtype."""
    s = torch.matmul(q, k.transpose(-1, -2)).to(_acc_dtype(q.dtype)) * scale
    return s if mask is None else s + mask


def _chunk_forward(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float):
    """One query chunk: q (..., n, D) -> (out (..., n, Dv), lse (..., n, 1))."""
    s = _scores(q, k, mask, scale)
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    return torch.matmul(torch.exp(s - lse).to(v.dtype), v), lse


def _chunk_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dout: Tensor,
    mask: Tensor | None,
    scale: float,
    out: Tensor | None = None,
    lse: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Vector-Jacobian product of one query chunk, in differentiable torch ops.

    Without `out`/`lse` the softmax is recomputed from q and k: the result is then differentiable
    in (q, k, v, dout), which the double backward differentiates. With them it is the cheaper
    first-order backward.

    Args:
        q: (..., n, D) query chunk; k: (..., Nk, D); v: (..., Nk, Dv); dout: (..., n, Dv).
        mask: additive mask rows of this chunk, broadcastable to (..., n, Nk), or None.
        scale: score scale.
        out: (..., n, Dv) saved forward output, optional.
        lse: (..., n, 1) saved logsumexp, optional.

    Returns:
        dq (..., n, D), and this chunk's contributions dk (..., Nk, D) and dv (..., Nk, Dv).
    """
    acc = _acc_dtype(q.dtype)
    s = _scores(q, k, mask, scale)
    p = torch.softmax(s, dim=-1) if lse is None else torch.exp(s - lse)
    dp = torch.matmul(dout, v.transpose(-1, -2)).to(acc)
    if out is None:
        delta = (p * dp).sum(-1, keepdim=True)
    else:
        delta = (dout.to(acc) * out.to(acc)).sum(-1, keepdim=True)
    ds = (p * (dp - delta) * scale).to(q.dtype)
    dq = torch.matmul(ds, k)
    dk = torch.matmul(ds.transpose(-1, -2), q)
    dv = torch.matmul(p.to(v.dtype).transpose(-1, -2), dout)
    return dq, dk, dv


def _map_chunks(fn: Callable, chunk: int, rows: tuple, n_rows: int) -> list[Tensor]:
    """Runs fn on query chunks: fn(*row slices of `rows`) -> (row results..., summed results...).

    The first n_rows results (..., n, *) are concatenated over chunks along -2; the others are
    summed over chunks in the accumulation dtype. `rows[0]` sets Nq; None entries and masks
    broadcast over queries (size 1 at -2) are passed whole.
    """
    nq = rows[0].shape[-2]
    parts, sums = [], []
    for a in range(0, nq, chunk):
        res = fn(*(_rows(x, a, a + chunk) for x in rows))
        parts.append(res[:n_rows])
        extra = [r.to(_acc_dtype(r.dtype)) for r in res[n_rows:]]
        sums = extra if not sums else [s + r for s, r in zip(sums, extra)]
    return [torch.cat(p, dim=-2) for p in zip(*parts)] + sums


def _chunked_forward(q, k, v, mask, scale, chunk):
    """Chunked first-order forward: (..., Nq, D) -> (out (..., Nq, Dv), lse (..., Nq))."""
    out, lse = _map_chunks(lambda qc, mc: _chunk_forward(qc, k, v, mc, scale), chunk, (q, mask), 2)
    return out, lse.squeeze(-1)


def _chunked_backward(q, k, v, out, lse, dout, mask, scale, chunk):
    """Chunked first-order backward from saved out and lse: -> (dq, dk, dv)."""
    dq, dk, dv = _map_chunks(
        lambda qc, dc, oc, lc, mc: _chunk_backward(qc, k, v, dc, mc, scale, oc, lc),
        chunk,
        (q, dout, out, lse.unsqueeze(-1), mask),
        1,
    )
    return dq, dk.to(k.dtype), dv.to(v.dtype)


CHUNKED = AttentionImpl(_chunked_forward, _chunked_backward)


class _Attention(torch.autograd.Function):
    """(q, k, v) -> (out, lse); lse is a non-differentiable by-product."""

    @staticmethod
    def forward(q, k, v, mask, scale, chunk, impl):
        return impl.forward(q, k, v, mask, scale, chunk)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, mask, scale, chunk, impl = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.save_for_forward(q, k, v, mask)
        ctx.args = (scale, chunk, impl)

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, mask = ctx.saved_tensors
        scale, chunk, impl = ctx.args
        grads = _AttentionBackward.apply(
            q, k, v, dout.contiguous(), out.detach(), lse.detach(), mask, scale, chunk, impl
        )
        return (*grads, None, None, None, None)

    @staticmethod
    def jvp(ctx, tq, tk, tv, *_):
        q, k, v, mask = ctx.saved_tensors
        scale, chunk, _ = ctx.args

        def tangent(qc, tqc, mc):
            p = torch.softmax(_scores(qc, k, mc, scale), dim=-1)
            ts = 0.0 if tq is None else torch.matmul(tqc, k.transpose(-1, -2)).to(p.dtype) * scale
            if tk is not None:
                ts = ts + torch.matmul(qc, tk.transpose(-1, -2)).to(p.dtype) * scale
            tout = torch.matmul((p * (ts - (p * ts).sum(-1, keepdim=True))).to(v.dtype), v)
            return (tout,) if tv is None else (tout + torch.matmul(p.to(v.dtype), tv),)

        return _map_chunks(tangent, chunk, (q, tq, mask), 1)[0], None


class _AttentionBackward(torch.autograd.Function):
    """(q, k, v, dout) -> (dq, dk, dv); out and lse are constants that only speed up the forward."""

    @staticmethod
    def forward(q, k, v, dout, out, lse, mask, scale, chunk, impl):
        return impl.backward(q, k, v, out, lse, dout, mask, scale, chunk)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, dout, _out, _lse, mask, scale, chunk, _impl = inputs
        ctx.save_for_backward(q, k, v, dout, mask)
        ctx.save_for_forward(q, k, v, dout, mask)
        ctx.args = (scale, chunk)

    @staticmethod
    def backward(ctx, gdq, gdk, gdv):
        q, k, v, dout, mask = ctx.saved_tensors
        scale, chunk = ctx.args

        def vjp(qc, dc, gqc, mc):  # -> (g_q rows, g_dout rows, g_k, g_v)
            _, pullback = torch.func.vjp(lambda *a: _chunk_backward(*a, mc, scale), qc, k, v, dc)
            gq_c, gk_c, gv_c, gd_c = pullback((gqc, gdk, gdv))
            return gq_c, gd_c, gk_c, gv_c

        gq, gdout, gk, gv = _map_chunks(vjp, chunk, (q, dout, gdq, mask), 2)
        return gq, gk.to(k.dtype), gv.to(v.dtype), gdout, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, tq, tk, tv, tdout, *_):
        q, k, v, dout, mask = ctx.saved_tensors
        scale, chunk = ctx.args

        def tangent(qc, dc, tqc, tdc, mc):
            return _chunk_backward_jvp(qc, k, v, dc, tqc, tk, tv, tdc, mc, scale)

        tdq, tdk, tdv = _map_chunks(tangent, chunk, (q, dout, tq, tdout, mask), 1)
        return tdq, tdk.to(k.dtype), tdv.to(v.dtype)


def _chunk_backward_jvp(q, k, v, dout, tq, tk, tv, tdout, mask, scale):
    """Forward-mode derivative of `_chunk_backward` (without out/lse) for one query chunk.

    Args:
        q, k, v, dout, mask, scale: as `_chunk_backward`.
        tq (..., n, D), tk (..., Nk, D), tv (..., Nk, Dv), tdout (..., n, Dv): tangents, or None
            for zero.

    Returns:
        Tangents of dq (..., n, D), dk (..., Nk, D) and dv (..., Nk, Dv).
    """
    acc = _acc_dtype(q.dtype)

    def mm(a, b):  # a @ b^T in the accumulation dtype; zero when a tangent is absent
        return 0.0 if a is None or b is None else torch.matmul(a, b.transpose(-1, -2)).to(acc)

    p = torch.softmax(_scores(q, k, mask, scale), dim=-1)
    ts = (mm(tq, k) + mm(q, tk)) * scale
    tp = p * (ts - (p * ts).sum(-1, keepdim=True))
    dp, tdp = mm(dout, v), mm(tdout, v) + mm(dout, tv)
    delta = (p * dp).sum(-1, keepdim=True)
    tdelta = (tp * dp + p * tdp).sum(-1, keepdim=True)
    ds = (p * (dp - delta) * scale).to(q.dtype)
    tds = ((tp * (dp - delta) + p * (tdp - tdelta)) * scale).to(q.dtype)
    tdq = torch.matmul(tds, k) + (0.0 if tk is None else torch.matmul(ds, tk))
    tdk = torch.matmul(tds.transpose(-1, -2), q)
    if tq is not None:
        tdk = tdk + torch.matmul(ds.transpose(-1, -2), tq)
    tdv = torch.matmul(tp.to(v.dtype).transpose(-1, -2), dout)
    if tdout is not None:
        tdv = tdv + torch.matmul(p.to(v.dtype).transpose(-1, -2), tdout)
    return tdq, tdk, tdv


def chunked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float | None = None,
    chunk: int = DEFAULT_CHUNK,
    attn_mask: Tensor | None = None,
    impl: AttentionImpl = CHUNKED,
) -> Tensor:
    """Exact attention whose autograd memory is O(N * chunk) at every order.

    First backward, double backward (reverse-over-reverse HVPs), forward-mode AD and
    forward-over-reverse (`torch.func.jvp` of `torch.func.grad`) all run query chunk by query
    chunk and never hold more than one (chunk, Nk) score block per head.

    Args:
        q: queries (B, H, Nq, D) (any leading dims, equal for q, k, v).
        k: keys (B, H, Nk, D).
        v: values (B, H, Nk, Dv).
        scale: score scale; None means D ** -0.5.
        chunk: query rows per chunk.
        attn_mask: additive float mask or boolean keep-mask broadcastable to (B, H, Nq, Nk); a
            constant (it must not require grad).
        impl: the first-order forward/backward kernels (the Triton ones plug in here).

    Returns:
        (B, H, Nq, Dv) in q's dtype.
    """
    lead_ok = q.dim() >= 2 and q.shape[:-2] == k.shape[:-2] and k.shape[:-1] == v.shape[:-1]
    if not lead_ok or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"attention shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
            " (expected q (..., Nq, D), k (..., Nk, D), v (..., Nk, Dv))"
        )
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if attn_mask is not None:
        if attn_mask.requires_grad:
            raise ValueError(
                "attn_mask must not require grad: masks are constants for this attention"
            )
        if attn_mask.dim() < 2:
            raise ValueError(
                f"attn_mask must broadcast to (..., Nq, Nk), got {tuple(attn_mask.shape)}"
            )
        attn_mask = additive_mask(attn_mask, _acc_dtype(q.dtype))
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _Attention.apply(q, k, v, attn_mask, scale, int(chunk), impl)[0]
