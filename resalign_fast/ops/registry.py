"""Operator registry: which backends an op has, why one cannot run, and which one runs.

A *backend* is a kernel provider of an op (cuda, triton, cpp, torch for the built-in fused ops;
triton, sdpa, chunked, math for attention; see resalign_fast.ops.backends); in resalign_fast.ops
the word means nothing else. Every op registers itself once, at import of its module, with its
implementations table (backend -> function, in `auto` order, every entry taking the same
arguments) and one function that explains why a backend cannot run:

    from resalign_fast.ops import registry

    # backend -> fn(x, out); auto order, most preferred first
    IMPLEMENTATIONS = {"triton": my_op_triton, "torch": lambda x, out: my_op_ref(x, out=out)}

    def not_supported_reasons(backend: str, *tensors: Tensor | None) -> list[str]:
        ...

    registry.register_op("my_op", IMPLEMENTATIONS, not_supported_reasons)

    def my_op(x, backend="auto", *, out=None):
        return registry.dispatch("my_op", backend, x, out)(x, out)  # raises if it cannot run

The one signature of every `not_supported_reasons` in resalign_fast (each op module's, the one an
op registers, the Triton kernels' own in resalign_fast.kernels.attention):

    not_supported_reasons(backend: str, *tensors: Tensor | None) -> list[str]

* backend: a backend name of the op.
* tensors: the op's tensor arguments, positionally, in the order of the op's call (None for an
  absent optional buffer); no tensors at all asks only what the environment lacks (a package,
  the extension, a device), which `availability` and `python -m resalign_fast.info` report.
* returns: one human-readable reason per obstacle; an empty list means `backend` can run them.

`registry.not_supported_reasons(op, backend, *tensors)` is the same call with the registered op
named first; attention's (resalign_fast.ops.attention) adds only the keyword `order`, which picks
its registry entry. Non-tensor arguments (scalars, sizes) never decide whether a backend runs.

`select_backend` walks the backends in order for "auto" and takes the first that has no reason
against the inputs; a backend asked for by name that cannot run raises `UnsupportedBackendError`,
whose message lists every reason. `dispatch` is `select_backend` followed by a look-up in the
op's table. An op may also pass `auto_skip(backend, *tensors) -> str | None` for a backend that
can run but that `auto` should not pick: the built-in ops use `backends.skip_interpreter`, since
the Triton interpreter is a debugging aid (~1.8 ms per program) and TRITON_INTERPRET=1, once set
for a test session, would otherwise reroute every CPU call through it. `check_buffers` and
`check_outputs` validate an op's buffers before dispatch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# The built-in ops' backend checks live in resalign_fast.ops.backends; importable from here too.
from resalign_fast.ops.backends import (  # noqa: F401
    CPU_DTYPES,
    GPU_DTYPES,
    STANDARD_BACKENDS,
    extension,
    extension_reasons,
    import_kernels,
    interpreter_active,
    skip_interpreter,
    standard_reasons,
    tensor_reasons,
    triton_reasons,
)

ReasonsFn = Callable[..., list[str]]


class UnsupportedBackendError(ValueError):
    """A backend asked for by name cannot run the given inputs; the message lists every reason."""


@dataclass(frozen=True)
class OpEntry:
    """One registered op.

    Attributes:
        name: op name, e.g. "richardson_step".
        backends: backend names in `auto` order.
        not_supported_reasons: `(backend, *tensors) -> list[str]`, empty when it can run.
        auto_skip: optional `(backend, *tensors) -> str | None`, why `auto` passes over a backend
            that can run.
        implementations: backend -> function (same arguments for every backend), or None for an
            op that registered backend names only and runs them itself.
    """

    name: str
    backends: tuple[str, ...]
    not_supported_reasons: ReasonsFn
    auto_skip: Callable[..., str | None] | None = None
    implementations: Mapping[str, Callable] | None = None


_OPS: dict[str, OpEntry] = {}


def register_op(
    name: str,
    implementations: Mapping[str, Callable] | Sequence[str],
    not_supported_reasons: ReasonsFn,
    auto_skip: Callable[..., str | None] | None = None,
) -> OpEntry:
    """Registers (or re-registers, e.g. on module reload) an op.

    Args:
        name: op name.
        implementations: backend -> function, in `auto` order (most preferred first), every
            function taking the op's same arguments; or only the backend names, in that order.
        not_supported_reasons: `(backend, *tensors) -> list[str]`; see the module docstring.
        auto_skip: optional `(backend, *tensors) -> str | None`; see the module docstring.

    Returns:
        The registry entry.
    """
    if not implementations:
        raise ValueError(f"op {name!r} registers no backend")
    table = dict(implementations) if isinstance(implementations, Mapping) else None
    entry = OpEntry(name, tuple(implementations), not_supported_reasons, auto_skip, table)
    _OPS[name] = entry
    return entry


def registered_ops() -> list[str]:
    """Names of the registered ops, in registration order."""
    return list(_OPS)


def get_op(name: str) -> OpEntry:
    """The entry of op `name`; KeyError naming the registered ops if there is none."""
    try:
        return _OPS[name]
    except KeyError:
        raise KeyError(f"no op {name!r} registered; registered: {registered_ops()}") from None


def not_supported_reasons(op: str, backend: str, *tensors: Tensor | None) -> list[str]:
    """Why `backend` cannot run op `op` on `tensors` (empty list: it can).

    Args:
        op: registered op name.
        backend: one of the op's backends.
        *tensors: the op's tensor arguments; none for an environment-only check.

    Returns:
        Human-readable reasons, one per obstacle.
    """
    entry = get_op(op)
    if backend not in entry.backends:
        return [f"{op} has no backend {backend!r} (backends: {', '.join(entry.backends)})"]
    return list(entry.not_supported_reasons(backend, *tensors))


def select_backend(op: str, backend: str, *tensors: Tensor | None) -> str:
    """The backend that runs `op` on `tensors`.

    Args:
        op: registered op name.
        backend: "auto" (the first backend in order that can run) or a backend name.
        *tensors: the op's tensor arguments.

    Returns:
        The backend name.

    Raises:
        UnsupportedBackendError: the named backend cannot run, or (auto) none can; every reason
            is listed.
    """
    entry = get_op(op)
    if backend != "auto":
        reasons = not_supported_reasons(op, backend, *tensors)
        if reasons:
            raise UnsupportedBackendError(
                f"{op}: backend {backend!r} cannot run these inputs: " + "; ".join(reasons)
            )
        return backend
    refused = []
    for name in entry.backends:
        reasons = list(entry.not_supported_reasons(name, *tensors))
        skip = None
        if entry.auto_skip is not None and not reasons:
            skip = entry.auto_skip(name, *tensors)
        if not reasons and skip is None:
            return name
        refused.append(f"{name}: " + "; ".join(reasons or [skip]))
    raise UnsupportedBackendError(f"{op}: no backend can run these inputs: " + " | ".join(refused))


def dispatch(op: str, backend: str, *tensors: Tensor | None) -> Callable:
    """The implementation of `op` that runs `tensors`: `select_backend`, then the op's table.

    Args:
        op: registered op name, registered with an implementations table.
        backend: "auto" or a backend name, as in `select_backend`.
        *tensors: the op's tensor arguments, as in `not_supported_reasons`.

    Returns:
        The selected backend's function; call it with the op's arguments.

    Raises:
        UnsupportedBackendError: as `select_backend`.
        LookupError: the op registered backend names only.
    """
    table = get_op(op).implementations
    if table is None:
        raise LookupError(f"op {op!r} registered backend names only, no implementations")
    return table[select_backend(op, backend, *tensors)]


def availability(op: str) -> dict[str, list[str]]:
    """Environment-only check of every backend of `op`: backend -> reasons (empty: available)."""
    entry = get_op(op)
    return {name: list(entry.not_supported_reasons(name)) for name in entry.backends}


# --------------------------------------------------------------------------------------------
# Argument checks the built-in ops run before dispatch.
# --------------------------------------------------------------------------------------------


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of reductions (norms) over buffers of `dtype`: fp32 for fp16/bf16, else `dtype`."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_buffers(op: str, **buffers: Tensor | None) -> None:
    """Raises ValueError unless every given tensor has the first one's shape, dtype and device.

    Args:
        op: op name, for the message.
        **buffers: name -> tensor; None entries are skipped.
    """
    items = [(name, t) for name, t in buffers.items() if t is not None]
    first_name, first = items[0]
    for name, t in items:
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
        if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
            raise ValueError(
                f"{op}: {name} is {tuple(t.shape)} {t.dtype} on {t.device}, but {first_name} is "
                f"{tuple(first.shape)} {first.dtype} on {first.device}"
            )


def check_outputs(op: str, like: Tensor, inputs: Sequence[Tensor], **outs: Tensor | None) -> None:
    """Raises ValueError unless each given output buffer matches `like` and overlaps no input.

    Args:
        op: op name, for the message.
        like: a tensor the outputs must match in shape, dtype and device.
        inputs: the op's input tensors.
        **outs: name -> output buffer; None entries are skipped.
    """
    given = {name: t for name, t in outs.items() if t is not None}
    check_buffers(op, like=like, **given)
    if like.device.type == "meta":
        return  # meta tensors have no addresses (data_ptr() is 0): nothing to compare
    spans = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in inputs]
    taken = []
    for name, t in given.items():
        lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        if any(lo < b and a < hi for a, b in spans + taken) and hi > lo:
            raise ValueError(f"{op}: {name} overlaps an input or another output")
        taken.append((lo, hi))
