"""Attention through the backend that supports the differentiation order the caller needs.

Backends (registry entries "attention" for order <= 1 and "attention_order2" above):

    triton   flash forward/backward in Triton (resalign_fast.kernels.attention); double backward
             and jvp by the chunked recomputation on top of them; fp16/bf16/fp32, no mask
    sdpa     torch.nn.functional.scaled_dot_product_attention: first order only
    chunked  `chunked_attention` (resalign_fast.ops._attention_chunked): exact at every order,
             O(N * chunk) autograd memory
    math     `attention_ref`, plain softmax(q k^T) v: O(N^2) memory; never picked by "auto"

`attention` dispatches through resalign_fast.ops.registry like every op (one implementations
table, one `not_supported_reasons(backend, *tensors)`, here with the keyword `order`) and
explains every refusal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from resalign_fast.ops import backends, registry
from resalign_fast.ops._attention_chunked import (  # noqa: F401  (public here)
    CHUNKED,
    DEFAULT_CHUNK,
    AttentionImpl,
    additive_mask,
    chunked_attention,
)


def attention_ref(
    q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, attn_mask: Tensor | None = None
) -> Tensor:
    """Plain math attention softmax(q k^T * scale + mask) v, the specification of every backend.

    Args:
        q: queries (B, H, Nq, D) (any leading dims).
        k: keys (B, H, Nk, D).
        v: values (B, H, Nk, Dv).
        scale: score scale; None means D ** -0.5.
        attn_mask: additive float mask or boolean keep-mask, broadcastable to (B, H, Nq, Nk).

    Returns:
        (B, H, Nq, Dv) in q's dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if attn_mask is not None:
        s = s + additive_mask(attn_mask, s.dtype)
    return torch.matmul(torch.softmax(s, dim=-1), v)


def _triton_module():
    return backends.import_kernels("attention")


def _triton_impl() -> AttentionImpl:
    """The Triton kernels (resalign_fast.kernels.attention) as an `AttentionImpl`: flash forward and
    backward; the higher orders reuse the chunked rules on top of them."""
    kern = _triton_module()

    def no_mask(mask: Tensor | None) -> None:
        if mask is not None:
            raise ValueError("triton attention has no mask support; use chunked_attention")

    def forward(q, k, v, mask, scale, chunk):
        no_mask(mask)
        return kern.attention_fwd_triton(q, k, v, scale)

    def backward(q, k, v, out, lse, dout, mask, scale, chunk):
        no_mask(mask)
        return kern.attention_bwd_triton(q, k, v, out, lse, dout, scale)

    return AttentionImpl(forward, backward)


def attention_triton(
    q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, chunk: int = DEFAULT_CHUNK
) -> Tensor:
    """Flash attention forward/backward in Triton; double backward and jvp via chunked
    recomputation.

    Args:
        q: (B, H, Nq, D); k, v: (B, H, Nk, D); fp16/bf16/fp32 on CUDA (or CPU under the
            interpreter).
        scale: score scale; None means D ** -0.5.
        chunk: query rows per chunk of the higher-order (chunked) rules.

    Returns:
        (B, H, Nq, D).

    Raises:
        ValueError: the inputs are not supported; lists every reason.
    """
    reasons = _triton_module().not_supported_reasons("triton", q, k, v)
    if reasons:
        raise ValueError("; ".join(reasons))
    return chunked_attention(q, k, v, scale, chunk, impl=_triton_impl())


# backend -> fn(q, k, v, scale, attn_mask, chunk); `auto` order per differentiation order below
IMPLEMENTATIONS = {
    "triton": lambda q, k, v, scale, mask, chunk: attention_triton(q, k, v, scale, chunk),
    "sdpa": lambda q, k, v, scale, mask, chunk: F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale
    ),
    "chunked": lambda q, k, v, scale, mask, chunk: chunked_attention(q, k, v, scale, chunk, mask),
    "math": lambda q, k, v, scale, mask, chunk: attention_ref(q, k, v, scale, mask),
}
# One registry entry per differentiation order ("auto" order differs, sdpa cannot do order 2).
OPS = {1: "attention", 2: "attention_order2"}
AUTO_ORDER = {1: ("sdpa", "chunked", "triton", "math"), 2: ("triton", "chunked", "sdpa", "math")}


def _op(order: int) -> str:
    """Registry entry of a differentiation order: 0, 1 -> "attention"; 2+ -> "attention_order2"."""
    return OPS[min(max(order, 1), 2)]


def _reasons(order: int):
    """The registered `not_supported_reasons(backend, q, k, v, attn_mask)` of one order."""

    def reasons(backend: str, q=None, k=None, v=None, attn_mask=None) -> list[str]:
        if backend == "sdpa" and order >= 2:
            return ["PyTorch's fused kernels implement neither double backward nor forward-mode AD"]
        if backend != "triton":
            return []
        if q is None:  # environment-only check
            return backends.triton_reasons([], interpreter_dtypes=(torch.float32,))
        if not q.is_cuda and not backends.interpreter_active():  # do not import the kernels
            return [
                f"triton: tensors are on {q.device.type}; CPU tensors need TRITON_INTERPRET=1 "
                "(set before triton is imported)"
            ]
        try:
            return _triton_module().not_supported_reasons(backend, q, k, v, attn_mask)
        except ImportError as e:
            return [f"resalign_fast.kernels.attention cannot be imported ({e})"]

    return reasons


def _auto_skip(order: int):
    def skip(backend: str, q=None, *tensors) -> str | None:
        if backend == "math":
            return "O(N^2) memory at every order: only by name"
        if backend == "triton" and q is not None and order >= 2 and q.dtype == torch.float32:
            return "fp32 Triton (IEEE dots) is slower than chunked: only by name"
        return backends.skip_interpreter(backend, q, *tensors)

    return skip


for _order, _name in OPS.items():
    _table = {b: IMPLEMENTATIONS[b] for b in AUTO_ORDER[_order]}
    registry.register_op(_name, _table, _reasons(_order), _auto_skip(_order))


def not_supported_reasons(
    backend: str,
    q: Tensor | None = None,
    k: Tensor | None = None,
    v: Tensor | None = None,
    attn_mask: Tensor | None = None,
    *,
    order: int = 1,
) -> list[str]:
    """Why `backend` cannot run `attention`'s inputs at `order` (as in `attention`); empty: it can.

    The one signature of resalign_fast.ops.registry, plus `order`: no tensors, an
    environment-only check.
    """
    return registry.not_supported_reasons(_op(order), backend, q, k, v, attn_mask)


def select_backend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    order: int = 1,
    backend: str = "auto",
) -> str:
    """The backend `attention` runs: the requested one, or for "auto" the first that can run.

    "auto": sdpa (PyTorch's flash kernels) for order <= 1; for order >= 2 triton on fp16/bf16 CUDA
    tensors, else chunked. H200, B=2, H=8, N=4096, D=40, one HVP by double backward: bf16 triton
    36 ms vs chunked 52 ms, fp32 triton 329 ms vs chunked 59 ms (IEEE fp32 dots), hence no fp32
    triton. "math" is never automatic. Raises registry.UnsupportedBackendError (a ValueError,
    listing every reason) when a backend asked for by name cannot run.
    """
    return registry.select_backend(_op(order), backend, q, k, v, attn_mask)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float | None = None,
    backend: str = "auto",
    order: int = 1,
    attn_mask: Tensor | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> Tensor:
    """Attention through a backend that supports the differentiation order the caller needs.

    Args:
        q: (B, H, Nq, D); k: (B, H, Nk, D); v: (B, H, Nk, Dv).
        scale: score scale; None means D ** -0.5.
        backend: "auto", "triton", "sdpa", "chunked" or "math" (see `select_backend`).
        order: 0 inference, 1 first-order reverse mode, 2 anything more (double backward,
            forward-mode AD, jvp of a gradient).
        attn_mask: additive float or boolean keep-mask broadcastable to (B, H, Nq, Nk).
        chunk: query rows per chunk for "chunked" and for the higher orders of "triton".

    Returns:
        (B, H, Nq, Dv).
    """
    run = registry.dispatch(_op(order), backend, q, k, v, attn_mask)
    return run(q, k, v, scale, attn_mask, chunk)
