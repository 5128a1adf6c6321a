"""Running the real step on meta tensors: the two places where meta differs from a real device.

Meta tensors have shapes, dtypes and storages of the right size but no data, and every aten op
has a meta kernel, so autograd (double backward and forward-mode included) runs unchanged. (Fake
tensors would too, but torch 2.13's `FakeTensorMode` breaks forward-over-reverse through
`layer_norm`, and is about 3x slower.) Two things need help:

* `F.scaled_dot_product_attention` on meta tensors always takes the math path, which
  materialises the (N, N) scores; a real device would run a fused kernel. `sdpa_as(target)` routes
  it to the kernel that device picks: on CUDA the memory-efficient kernel for fp32 (its only fused
  fp32 kernel) and flash attention for fp16/bf16; on CPU the CPU flash kernel. Each saves the
  output and an O(N) log-sum-exp, as on the device.
* The project's compiled ops (`resalign_fast.ops.registry`) read data pointers. `reference_ops()`
  makes every registered op with a "torch" backend run it (plain torch, same outputs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

TARGETS = ("cuda", "cpu")


def _sdpa_for(target: str):
    def sdpa(
        query,
        key,
        value,
        attn_mask=None,
        dropout_p=0.0,
        is_causal=False,
        scale=None,
        enable_gqa=False,
    ):
        if enable_gqa:
            raise ValueError("memory planner: enable_gqa SDPA is not modelled")
        if target == "cpu":
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
            )[0]
        if query.dtype in (torch.float16, torch.bfloat16) and attn_mask is None:
            return torch.ops.aten._scaled_dot_product_flash_attention(
                query, key, value, dropout_p, is_causal, False, scale=scale
            )[0]
        lse = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, attn_mask, lse, dropout_p, is_causal, scale=scale
        )[0]

    return sdpa


@contextlib.contextmanager
def sdpa_as(target: str) -> Iterator[None]:
    """While the block runs, `F.scaled_dot_product_attention` runs `target`'s fused kernel.

    Args:
        target: "cuda" or "cpu".

    Raises:
        ValueError: unknown target.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {TARGETS}")
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _sdpa_for(target)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@contextlib.contextmanager
def reference_ops() -> Iterator[None]:
    """Run the project's registered ops with their plain-torch backend while the block runs.

    The built-in ops work parameter tensor by parameter tensor, so the reference's temporaries add
    at most a few copies of the largest parameter tensor (59 MB in SD v1.4's UNet) over the fused
    kernels: an over-estimate by that much at most.
    """
    from resalign_fast.ops import registry

    original = registry.select_backend

    def select(op: str, backend: str, *tensors):
        if "torch" in registry.get_op(op).backends:
            return "torch"
        return original(op, backend, *tensors)

    registry.select_backend = select
    try:
        yield
    finally:
        registry.select_backend = original


class _Uncachable(Exception):
    pass


_PRIMITIVES = (
    int,
    float,
    bool,
    str,
    type(None),
    torch.dtype,
    torch.device,
    torch.layout,
    torch.memory_format,
)


def _sig(x):
    if isinstance(x, torch.Tensor):
        return (x.shape, x.stride(), x.dtype, x.device.type, x.storage_offset())
    if isinstance(x, (list, tuple)):
        return (type(x), tuple(_sig(e) for e in x))
    if isinstance(x, _PRIMITIVES):
        return (type(x), x)
    raise _Uncachable


def _needed(shape, stride, itemsize: int) -> int:
    if any(s == 0 for s in shape):
        return 0
    return (1 + sum((s - 1) * st for s, st in zip(shape, stride))) * itemsize


class MetaOpCache:
    """Memoised meta kernels: outputs of a functional op depend only on its inputs' metadata.

    Many meta kernels are Python reference implementations (about 100 us per elementwise op in
    torch 2.13). For ops that neither mutate nor alias their inputs, the first call runs the
    kernel and records its outputs' shapes, strides and dtypes; later calls with the same input
    metadata and arguments get fresh `empty_strided` meta tensors. Outputs whose storage is not
    exactly what `empty_strided` allocates are never cached, so storage sizes stay exact.

    Use it as the `run_op` of a `StorageTracker` that runs on meta tensors.
    """

    def __init__(self) -> None:
        self._memo: dict = {}
        self._functional: dict = {}
        self.hits = 0
        self.misses = 0

    def _is_functional(self, func) -> bool:
        ok = self._functional.get(func)
        if ok is None:
            schema = func._schema
            ok = not schema.is_mutable and all(r.alias_info is None for r in schema.returns)
            self._functional[func] = ok
        return ok

    def __call__(self, func, args, kwargs):
        if not self._is_functional(func):
            return func(*args, **kwargs)
        try:
            key = (func, _sig(args), _sig(tuple(sorted(kwargs.items()))))
        except _Uncachable:
            return func(*args, **kwargs)
        rec = self._memo.get(key)
        if rec is not None:
            if rec is False:
                return func(*args, **kwargs)
            self.hits += 1
            return _build(rec)
        self.misses += 1
        out = func(*args, **kwargs)
        self._memo[key] = _record(out)
        return out


def _record(out):
    """Metadata to rebuild `out`, or False when it cannot be rebuilt exactly."""
    seen: set[int] = set()

    def rec(x):
        if isinstance(x, torch.Tensor):
            if x.device.type != "meta" or x.layout != torch.strided or x.storage_offset() != 0:
                raise _Uncachable
            st = x.untyped_storage()
            if st._cdata in seen or st.nbytes() != _needed(x.shape, x.stride(), x.element_size()):
                raise _Uncachable
            seen.add(st._cdata)
            return ("T", tuple(x.shape), tuple(x.stride()), x.dtype, x.requires_grad)
        if isinstance(x, (list, tuple)):
            return (type(x), [rec(e) for e in x])
        if isinstance(x, _PRIMITIVES):
            return ("V", x)
        raise _Uncachable

    try:
        return rec(out)
    except _Uncachable:
        return False


def _build(rec):
    tag = rec[0]
    if tag == "T":
        return torch.empty_strided(
            rec[1], rec[2], dtype=rec[3], device="meta", requires_grad=rec[4]
        )
    if tag == "V":
        return rec[1]
    return tag(_build(e) for e in rec[1])
