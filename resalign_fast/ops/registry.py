"""Operator registry: which backends an op has, why one cannot run, and which one runs.

Every fused op registers itself here once, at import of its module, with the backends it has in
`auto` order and one function that explains why a backend cannot run:

    from resalign_fast.ops import registry

    BACKENDS = ("triton", "sdpa", "chunked", "math")      # auto order, most preferred first

    def not_supported_reasons(backend: str, *tensors: Tensor) -> list[str]:
        # Empty list: `backend` can run these inputs. Called with no tensors, report only what the
        # environment lacks (missing package or device); `python -m resalign_fast.info` does that.
        ...

    registry.register_op("attention", BACKENDS, not_supported_reasons)

    def attention(q, k, v, backend="auto"):
        backend = registry.select_backend("attention", backend, q, k, v)  # raises if it cannot run
        ...run that backend...

`select_backend` walks the backends in order for "auto" and takes the first that has no reason
against the inputs; a backend asked for by name that cannot run raises `UnsupportedBackendError`,
whose message lists every reason. An op may also pass `auto_skip(backend, *tensors) -> str | None`
for a backend that can run but that `auto` should not pick: the built-in ops use
`skip_interpreter`, since the Triton interpreter is a debugging aid (~1.8 ms per program) and
TRITON_INTERPRET=1, once set for a test session, would otherwise reroute every CPU call through it.
The helpers below (`extension`, `tensor_reasons`, `triton_reasons`, `standard_reasons`,
`check_buffers`, `check_outputs`, `import_kernels`) are the checks the built-in ops share.

The built-in fused ops use the backends `STANDARD_BACKENDS` ("cuda", "triton", "cpp", "torch").
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

#: Backends of the built-in ops, in `auto` order: CUDA kernels (resalign_fast._C), Triton kernels
#: (resalign_fast.kernels), C++/OpenMP CPU kernels (resalign_fast._C), the plain-torch reference.
STANDARD_BACKENDS: tuple[str, ...] = ("cuda", "triton", "cpp", "torch")

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
    """

    name: str
    backends: tuple[str, ...]
    not_supported_reasons: ReasonsFn
    auto_skip: Callable[..., str | None] | None = None


_OPS: dict[str, OpEntry] = {}


def register_op(
    name: str,
    backends: Sequence[str],
    not_supported_reasons: ReasonsFn,
    auto_skip: Callable[..., str | None] | None = None,
) -> OpEntry:
    """Registers (or re-registers, e.g. on module reload) an op.

    Args:
        name: op name.
        backends: backend names in `auto` order, most preferred first.
        not_supported_reasons: `(backend, *tensors) -> list[str]`; see the module docstring.
        auto_skip: optional `(backend, *tensors) -> str | None`; see the module docstring.

    Returns:
        The registry entry.
    """
    if not backends:
        raise ValueError(f"op {name!r} registers no backend")
    entry = OpEntry(name, tuple(backends), not_supported_reasons, auto_skip)
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


def not_supported_reasons(op: str, backend: str, *tensors: Tensor) -> list[str]:
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


def select_backend(op: str, backend: str, *tensors: Tensor) -> str:
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
        skip = entry.auto_skip(name, *tensors) if entry.auto_skip is not None and not reasons else None
        if not reasons and skip is None:
            return name
        refused.append(f"{name}: " + "; ".join(reasons or [skip]))
    raise UnsupportedBackendError(f"{op}: no backend can run these inputs: " + " | ".join(refused))


def availability(op: str) -> dict[str, list[str]]:
    """Environment-only check of every backend of `op`: backend -> reasons (empty: available)."""
    entry = get_op(op)
    return {name: list(entry.not_supported_reasons(name)) for name in entry.backends}


# --------------------------------------------------------------------------------------------
# Shared checks for the built-in ops.
# --------------------------------------------------------------------------------------------

_EXT: ModuleType | None = None
_EXT_ERROR: str | None = None


def extension() -> tuple[ModuleType | None, str | None]:
    """The compiled extension `resalign_fast._C`, imported once.

    Returns:
        (module, None) when it loads, else (None, why it does not).
    """
    global _EXT, _EXT_ERROR
    if _EXT is None and _EXT_ERROR is None:
        try:
            _EXT = importlib.import_module("resalign_fast._C")
        except ImportError as exc:
            _EXT_ERROR = f"resalign_fast._C is not built ({exc})"
    return _EXT, _EXT_ERROR


def extension_reasons(symbol: str) -> list[str]:
    """Reasons why the extension cannot provide `symbol` (e.g. "richardson_step_cuda")."""
    ext, error = extension()
    if ext is None:
        return [str(error)]
    if not hasattr(ext, symbol):
        variant = ext.build_info().get("variant", "?")
        if variant == "cpu" and symbol.endswith("_cuda"):
            return ["resalign_fast._C is the CPU-only build (no CUDA kernels)"]
        return [f"resalign_fast._C ({variant} build) has no {symbol}"]
    return []


def tensor_reasons(
    tensors: Iterable[Tensor],
    *,
    device_type: str | None,
    dtypes: Iterable[torch.dtype],
    allow_grad: bool = False,
) -> list[str]:
    """Reasons why a kernel that needs contiguous tensors of `dtypes` on `device_type` cannot run.

    Args:
        tensors: the op's tensor arguments (None entries are ignored).
        device_type: "cpu", "cuda", or None for any device.
        dtypes: supported dtypes.
        allow_grad: False: refuse inputs that require grad while grad mode is on (the kernel is
            forward-only and would silently cut the graph).
    """
    dtypes = tuple(dtypes)
    reasons: list[str] = []
    for i, t in enumerate(tensors):
        if t is None:
            continue
        if device_type is not None and t.device.type != device_type:
            reasons.append(f"tensor {i} is on {t.device}, needs {device_type}")
        if t.dtype not in dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            reasons.append(f"tensor {i} is {str(t.dtype).removeprefix('torch.')}, needs one of {names}")
        if not t.is_contiguous():
            reasons.append(f"tensor {i} is not contiguous")
        if not allow_grad and t.requires_grad and torch.is_grad_enabled():
            reasons.append(f"tensor {i} requires grad; this kernel is forward-only")
    return reasons


def triton_reasons(tensors: Sequence[Tensor], *, interpreter_dtypes: Iterable[torch.dtype]) -> list[str]:
    """Reasons why Triton cannot run: package missing, or CPU tensors without the interpreter.

    Args:
        tensors: the op's tensor arguments (none: environment-only check).
        interpreter_dtypes: dtypes the Triton interpreter handles for CPU tensors.
    """
    if importlib.util.find_spec("triton") is None:
        return ["triton is not installed"]
    on_cpu = [t for t in tensors if t is not None and t.device.type == "cpu"]
    if not tensors:
        if torch.cuda.is_available() or interpreter_active():
            return []
        return ["no CUDA device, and the Triton interpreter is off (TRITON_INTERPRET=1 before triton is imported)"]
    if on_cpu:
        if not interpreter_active():
            return ["CPU tensors run only under the Triton interpreter (TRITON_INTERPRET=1 before triton is imported)"]
        allowed = tuple(interpreter_dtypes)
        bad = [t.dtype for t in on_cpu if t.dtype not in allowed]
        if bad:
            return [f"the Triton interpreter does not run {str(bad[0]).removeprefix('torch.')} here"]
    return []


CPU_DTYPES = (torch.float32, torch.float64)
GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def standard_reasons(symbol: str, backend: str, tensors: Sequence[Tensor], *, allow_grad: bool = False) -> list[str]:
    """Reasons for the STANDARD_BACKENDS of a built-in op whose kernels are `_C.<symbol>_cpu`,
    `_C.<symbol>_cuda` and a Triton launcher; torch (the reference) always runs.

    Args:
        symbol: kernel base name, e.g. "richardson_step".
        backend: one of STANDARD_BACKENDS.
        tensors: the op's tensor arguments (none: environment-only check).
        allow_grad: see `tensor_reasons`.
    """
    if backend == "torch":
        return []
    if backend == "cpp":
        reasons = extension_reasons(f"{symbol}_cpu")
        return reasons + tensor_reasons(tensors, device_type="cpu", dtypes=CPU_DTYPES, allow_grad=allow_grad)
    if backend == "cuda":
        reasons = extension_reasons(f"{symbol}_cuda")
        if not torch.cuda.is_available():
            reasons.append("no CUDA device")
        return reasons + tensor_reasons(tensors, device_type="cuda", dtypes=GPU_DTYPES, allow_grad=allow_grad)
    if backend == "triton":
        reasons = triton_reasons(tensors, interpreter_dtypes=CPU_DTYPES)
        return reasons + tensor_reasons(tensors, device_type=None, dtypes=GPU_DTYPES, allow_grad=allow_grad)
    return [f"unknown backend {backend!r}"]


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


def skip_interpreter(backend: str, *tensors: Tensor) -> str | None:
    """`auto_skip` of the built-in ops: `auto` never sends CPU tensors to the Triton interpreter."""
    if backend == "triton" and any(t is not None and t.device.type == "cpu" for t in tensors):
        return "the Triton interpreter runs only when asked for by name (backend='triton')"
    return None


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


def interpreter_active() -> bool:
    """Whether Triton kernels run in the interpreter in this process.

    Triton decides when `@triton.jit` runs (its own standard library included), from
    TRITON_INTERPRET=1 at that moment: setting the variable after triton is imported has no effect.
    """
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    if "triton.language" not in sys.modules:
        return True  # triton will be imported in interpreter mode
    return type(sys.modules["triton.language"].sum).__name__ == "InterpretedFunction"


def import_kernels(name: str) -> ModuleType:
    """Imports `resalign_fast.kernels.<name>`, also from a source checkout that is not installed.

    The Triton kernels live in the top-level `kernels/` folder, installed as `resalign_fast.kernels`
    (a top-level `kernels` package collides with one on PyPI). An installed or editable package
    finds it; a bare source checkout gets it attached from `kernels/` here.
    """
    try:
        return importlib.import_module(f"resalign_fast.kernels.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != "resalign_fast.kernels":
            raise
    source = Path(__file__).resolve().parents[2] / "kernels"
    init = source / "__init__.py"
    if not init.is_file():
        raise ModuleNotFoundError(f"resalign_fast.kernels is not installed and {init} is missing")
    spec = importlib.util.spec_from_file_location(
        "resalign_fast.kernels", init, submodule_search_locations=[str(source)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["resalign_fast.kernels"] = module
    spec.loader.exec_module(module)
    return importlib.import_module(f"resalign_fast.kernels.{name}")
