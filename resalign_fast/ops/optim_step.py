"""Fused, in-place optimizer steps for the simulated fine-tuning (one tensor per call).

`sgd_step` and `adam_step` reproduce torch.optim.SGD / Adam / AdamW (single-tensor implementation,
foreach=False, fused=False) in one pass over the buffers instead of 4-8 torch kernels.

Agreement with torch.optim (tests/ops/test_optim_step.py):
- cpp, fp32 and fp64: bit for bit. The kernels follow torch's operation order and fuse exactly
  the multiply-adds that torch's CPU kernels fuse (`add(alpha=)`, `lerp`, `addcmul` use
  Vectorized::fmadd, an FMA instruction on AVX2/AVX512; the x86 DEFAULT build does not fuse).
- cuda and triton: within 2 ulp of |param| per element (one step). torch's CUDA kernels divide
  by a scalar as a multiplication by its reciprocal and the compiler decides what it contracts,
  so the operation order cannot be matched exactly; each such difference is one rounding.
"""

from __future__ import annotations

import functools
import platform
from collections.abc import Callable

import torch
from torch import Tensor

from resalign_fast.ops import backends, registry


def sgd_step_ref(
    param: Tensor,
    grad: Tensor,
    momentum_buf: Tensor | None,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    first_step: bool,
) -> None:
    """torch.optim.SGD's update (dampening 0, no nesterov), in place; the reference.

    Args:
        param: (N,) parameters, updated in place.
        grad: (N,) gradient (not modified).
        momentum_buf: (N,) momentum buffer, updated in place; may be None when momentum == 0.
        lr: learning rate.
        momentum: momentum factor (0: plain SGD).
        weight_decay: L2 coefficient added to the gradient.
        first_step: True on the first step, when torch sets the buffer to the gradient.
    """
    with torch.no_grad():
        g = grad.add(param, alpha=weight_decay) if weight_decay != 0 else grad
        if momentum != 0:
            if first_step:
                momentum_buf.copy_(g)
            else:
                momentum_buf.mul_(momentum).add_(g)
            g = momentum_buf
        param.add_(g, alpha=-lr)


def adam_step_ref(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
) -> None:
    """torch.optim.Adam (decoupled=False) / AdamW (decoupled=True) update, in place; the reference.

    Args:
        param: (N,) parameters, updated in place.
        grad: (N,) gradient (not modified).
        exp_avg: (N,) first moment, updated in place.
        exp_avg_sq: (N,) second moment, updated in place.
        step: number of this step, 1 for the first (torch increments its counter before use).
        lr, beta1, beta2, eps: as torch.optim.Adam.
        weight_decay: L2 coefficient (Adam) or decoupled decay rate (AdamW).
        decoupled: True for AdamW.
    """
    step_size, bc2_sqrt = _bias_corrections(step, lr, beta1, beta2)
    _adam_ref(
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        decoupled,
        step_size,
        bc2_sqrt,
    )


def _adam_ref(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    decoupled,
    step_size,
    bc2_sqrt,
) -> None:
    """`adam_step_ref` with the kernels' arguments: the bias corrections already computed."""
    with torch.no_grad():
        g = grad
        if weight_decay != 0:
            if decoupled:
                param.mul_(1 - lr * weight_decay)
            else:
                g = g.add(param, alpha=weight_decay)
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)


def _sgd_ref(param, grad, momentum_buf, lr, momentum, weight_decay, first_step) -> None:
    """`sgd_step_ref` with the kernels' (positional) arguments."""
    sgd_step_ref(
        param,
        grad,
        momentum_buf,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        first_step=first_step,
    )


def _bias_corrections(step: int, lr: float, beta1: float, beta2: float) -> tuple[float, float]:
    """(lr / (1 - beta1**step), (1 - beta2**step) ** 0.5), in Python floats as torch.optim."""
    return lr / (1 - beta1**step), (1 - beta2**step) ** 0.5


@functools.cache
def torch_cpu_fuses_multiply_add() -> bool:
    """Whether torch's CPU kernels compute `add(alpha=)`, `lerp`, `addcmul` with FMA instructions.

    They use Vectorized::fmadd: an FMA on x86 AVX2/AVX512 and on ARM, separate multiply and add in
    the x86 DEFAULT build (ATEN_CPU_CAPABILITY=default or an old CPU).
    """
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        return torch.backends.cpu.get_cpu_capability() != "DEFAULT"
    return True


def _bump_versions(*tensors: Tensor | None) -> None:
    # The kernels write through raw pointers; tell autograd the tensors changed, as in-place ops do.
    for t in tensors:
        if t is not None:
            torch.autograd.graph.increment_version(t)


def _fused(op: str, backend: str) -> Callable[..., None]:
    """The in-place kernel of `op` on a fused backend, called with the kernels' arguments (param,
    grad, the state buffers, then the scalars); the C++ kernels also take `use_fma`."""

    def step(param: Tensor, grad: Tensor, *rest) -> None:
        if backend == "triton":
            kernel = getattr(backends.import_kernels("optim_step"), f"{op}_triton")
        else:
            suffix = "cpu" if backend == "cpp" else "cuda"
            kernel = getattr(backends.extension()[0], f"{op}_{suffix}")
        use_fma = (torch_cpu_fuses_multiply_add(),) if backend == "cpp" else ()
        kernel(param, grad, *rest, *use_fma)
        _bump_versions(param, *(t for t in rest if isinstance(t, Tensor)))

    return step


def _implementations(op: str, reference: Callable[..., None]) -> dict[str, Callable[..., None]]:
    """backend -> fn(kernel arguments) for op, in auto order (backends.STANDARD_BACKENDS)."""
    return {b: _fused(op, b) for b in ("cuda", "triton", "cpp")} | {"torch": reference}


# backend -> fn(param, grad, momentum_buf, lr, momentum, weight_decay, first_step)
SGD_IMPLEMENTATIONS = _implementations("sgd_step", _sgd_ref)
# backend -> fn(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, decoupled,
#               step_size, bc2_sqrt)
ADAM_IMPLEMENTATIONS = _implementations("adam_step", _adam_ref)


def sgd_not_supported_reasons(backend: str, *tensors: Tensor | None) -> list[str]:
    """Why `backend` cannot run sgd_step on (param, grad, momentum_buf) (empty: it can)."""
    return backends.standard_reasons("sgd_step", backend, tensors, allow_grad=True)


def adam_not_supported_reasons(backend: str, *tensors: Tensor | None) -> list[str]:
    """Why `backend` cannot run adam_step on (param, grad, exp_avg, exp_avg_sq) (empty: it can)."""
    return backends.standard_reasons("adam_step", backend, tensors, allow_grad=True)


registry.register_op(
    "sgd_step", SGD_IMPLEMENTATIONS, sgd_not_supported_reasons, backends.skip_interpreter
)
registry.register_op(
    "adam_step", ADAM_IMPLEMENTATIONS, adam_not_supported_reasons, backends.skip_interpreter
)


def sgd_step(
    param: Tensor,
    grad: Tensor,
    momentum_buf: Tensor | None,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    first_step: bool,
    backend: str = "auto",
) -> None:
    """One torch.optim.SGD step (dampening 0, no nesterov) on one tensor, in place.

    Args:
        param: (N,) parameters, updated in place; grad and momentum_buf alike.
        grad: (N,) gradient (not modified).
        momentum_buf: (N,) momentum buffer, updated in place; None allowed when momentum == 0.
        lr: learning rate, >= 0.
        momentum: momentum factor in [0, 1).
        weight_decay: L2 coefficient, >= 0.
        first_step: True on the first step (the buffer becomes the gradient).
        backend: "auto" (cuda -> triton -> cpp -> torch) or one of those names.

    Raises:
        ValueError: bad hyperparameters, mismatched buffers, or a named backend that cannot run.
    """
    if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0:
        raise ValueError(
            f"sgd_step: need lr >= 0, 0 <= momentum < 1, weight_decay >= 0; got {lr}, {momentum}, "
            f"{weight_decay}"
        )
    if momentum != 0 and momentum_buf is None:
        raise ValueError(f"sgd_step: momentum {momentum} needs a momentum_buf")
    buf = momentum_buf if momentum != 0 else None
    registry.check_buffers("sgd_step", param=param, grad=grad, momentum_buf=buf)
    run = registry.dispatch("sgd_step", backend, param, grad, buf)
    run(param, grad, buf, float(lr), float(momentum), float(weight_decay), bool(first_step))


def adam_step(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    backend: str = "auto",
) -> None:
    """One torch.optim.Adam (decoupled=False) or AdamW (decoupled=True) step on one tensor, in
    place.

    Args:
        param: (N,) parameters, updated in place; the other buffers alike.
        grad: (N,) gradient (not modified).
        exp_avg: (N,) first moment, updated in place (zeros before the first step).
        exp_avg_sq: (N,) second moment, updated in place (zeros before the first step).
        step: number of this step, >= 1 (1 for the first, as torch counts after incrementing).
        lr: learning rate, >= 0.
        beta1: first-moment decay in [0, 1).
        beta2: second-moment decay in [0, 1).
        eps: denominator term, >= 0.
        weight_decay: >= 0; L2 added to the gradient (Adam) or decoupled decay (AdamW).
        decoupled: True for AdamW.
        backend: "auto" (cuda -> triton -> cpp -> torch) or one of those names.

    Raises:
        ValueError: bad hyperparameters, mismatched buffers, or a named backend that cannot run.
    """
    if int(step) != step or step < 1:
        raise ValueError(f"adam_step: step must be an integer >= 1, got {step}")
    if lr < 0 or not 0 <= beta1 < 1 or not 0 <= beta2 < 1 or eps < 0 or weight_decay < 0:
        raise ValueError(
            f"adam_step: need lr >= 0, betas in [0, 1), eps >= 0, weight_decay >= 0; "
            f"got lr={lr}, betas=({beta1}, {beta2}), eps={eps}, weight_decay={weight_decay}"
        )
    registry.check_buffers(
        "adam_step", param=param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq
    )
    run = registry.dispatch("adam_step", backend, param, grad, exp_avg, exp_avg_sq)
    step_size, bc2_sqrt = _bias_corrections(int(step), float(lr), float(beta1), float(beta2))
    run(
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        float(lr),
        float(beta1),
        float(beta2),
        float(eps),
        float(weight_decay),
        bool(decoupled),
        step_size,
        bc2_sqrt,
    )
