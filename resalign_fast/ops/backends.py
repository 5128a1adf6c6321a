"""The backends of the built-in fused ops: what each needs to run, and where its kernels are.

In resalign_fast.ops a *backend* is a kernel provider of an op and nothing else. The built-in
fused ops (richardson_step, fd_perturb, fd_combine, sgd_step, adam_step) have STANDARD_BACKENDS:

    cuda     CUDA kernels in resalign_fast._C (csrc/*_cuda.cu): a CUDA build and a CUDA device
    triton   Triton kernels in resalign_fast.kernels (kernels/): triton and a CUDA device, or CPU
             tensors under Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)
    cpp      C++/OpenMP CPU kernels in resalign_fast._C (csrc/*_cpu.cpp): fp32/fp64 CPU tensors
    torch    the plain-torch reference `<op>_ref`: always runs

Attention has its own backends (triton, sdpa, chunked, math; resalign_fast.ops.attention). The
functions here build the reasons of `resalign_fast.ops.registry`'s one `not_supported_reasons`
signature; `interpreter_active` is the only reader of TRITON_INTERPRET in the package.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

#: Backends of the built-in ops, in `auto` order: CUDA kernels (resalign_fast._C), Triton kernels
#: (resalign_fast.kernels), C++/OpenMP CPU kernels (resalign_fast._C), the plain-torch reference.
STANDARD_BACKENDS: tuple[str, ...] = ("cuda", "triton", "cpp", "torch")

CPU_DTYPES = (torch.float32, torch.float64)
GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

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


def tensor_reasons(
    tensors: Iterable[Tensor | None],
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
    names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
    reasons: list[str] = []
    for i, t in enumerate(tensors):
        if t is None:
            continue
        if device_type is not None and t.device.type != device_type:
            reasons.append(f"tensor {i} is on {t.device}, needs {device_type}")
        if t.dtype not in dtypes:
            dtype = str(t.dtype).removeprefix("torch.")
            reasons.append(f"tensor {i} is {dtype}, needs one of {names}")
        if not t.is_contiguous():
            reasons.append(f"tensor {i} is not contiguous")
        if not allow_grad and t.requires_grad and torch.is_grad_enabled():
            reasons.append(f"tensor {i} requires grad; this kernel is forward-only")
    return reasons


def triton_reasons(
    tensors: Sequence[Tensor | None], *, interpreter_dtypes: Iterable[torch.dtype]
) -> list[str]:
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
        return [
            "no CUDA device, and the Triton interpreter is off "
            "(TRITON_INTERPRET=1 before triton is imported)"
        ]
    if on_cpu:
        if not interpreter_active():
            return [
                "CPU tensors run only under the Triton interpreter "
                "(TRITON_INTERPRET=1 before triton is imported)"
            ]
        allowed = tuple(interpreter_dtypes)
        bad = [t.dtype for t in on_cpu if t.dtype not in allowed]
        if bad:
            dtype = str(bad[0]).removeprefix("torch.")
            return [f"the Triton interpreter does not run {dtype} here"]
    return []


def standard_reasons(
    symbol: str, backend: str, tensors: Sequence[Tensor | None], *, allow_grad: bool = False
) -> list[str]:
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
        return reasons + tensor_reasons(
            tensors, device_type="cpu", dtypes=CPU_DTYPES, allow_grad=allow_grad
        )
    if backend == "cuda":
        reasons = extension_reasons(f"{symbol}_cuda")
        if not torch.cuda.is_available():
            reasons.append("no CUDA device")
        return reasons + tensor_reasons(
            tensors, device_type="cuda", dtypes=GPU_DTYPES, allow_grad=allow_grad
        )
    if backend == "triton":
        reasons = triton_reasons(tensors, interpreter_dtypes=CPU_DTYPES)
        return reasons + tensor_reasons(
            tensors, device_type=None, dtypes=GPU_DTYPES, allow_grad=allow_grad
        )
    return [f"unknown backend {backend!r}"]


def skip_interpreter(backend: str, *tensors: Tensor | None) -> str | None:
    """`auto_skip` of the built-in ops: `auto` never sends CPU tensors to the Triton interpreter."""
    if backend == "triton" and any(t is not None and t.device.type == "cpu" for t in tensors):
        return "the Triton interpreter runs only when asked for by name (backend='triton')"
    return None


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
