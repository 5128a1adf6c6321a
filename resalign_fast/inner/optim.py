"""Functional SGD / Adam / AdamW for simulating downstream fine-tuning.

Each optimizer matches ``torch.optim`` (its single-tensor CPU path, ``foreach=False``) formula for
formula and in the same operation order, so fp32 trajectories agree bit for bit on CPU and fp64 ones
to rounding. Two entry points share one state type:

- :func:`step` is pure: it returns new parameters and a new state, never modifies its inputs and
  builds an autograd graph when its inputs require grad (unrolled hypergradients differentiate it).
- :func:`step_` updates parameters and state in place under ``no_grad``: the fast path of the
  no-graph simulation. It calls the fused kernels of ``resalign_fast.ops.optim_step``;
  :func:`step_ref_` is the same update through that module's plain-torch references.

Unlike the ResAlign reference code, state never outlives a simulation: :func:`init_state` gives a
fresh state (step 0, zero buffers) and bias correction is applied once, as in ``torch.optim.Adam``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from resalign_fast.ops import optim_step

__all__ = ["OptimSpec", "OptState", "init_state", "step", "step_", "step_ref_"]

_NAMES = ("sgd", "adam", "adamw")
# torch.optim defaults: Adam couples an L2 term of 0 into the gradient, AdamW decays by 1e-2.
_DEFAULT_WEIGHT_DECAY = {"sgd": 0.0, "adam": 0.0, "adamw": 1e-2}


@dataclass(frozen=True)
class OptimSpec:
    """One simulated optimizer, with ``torch.optim`` semantics.

    Attributes:
        name: "sgd", "adam" or "adamw".
        lr: Learning rate (>= 0).
        momentum: SGD momentum in [0, 1) (dampening 0, no Nesterov); must be 0 for Adam/AdamW.
        betas: Adam coefficients (beta1, beta2), each in [0, 1).
        eps: Adam denominator term (>= 0).
        weight_decay: SGD and Adam add ``weight_decay * param`` to the gradient (L2); AdamW
            multiplies the parameter by ``1 - lr * weight_decay`` (decoupled). None (the default)
            takes torch.optim's default: 0 for SGD and Adam, 1e-2 for AdamW.
    """

    name: str
    lr: float
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float | None = None

    def __post_init__(self) -> None:
        if self.name not in _NAMES:
            raise ValueError(f"OptimSpec.name must be one of {_NAMES}, got {self.name!r}")
        if self.weight_decay is None:
            object.__setattr__(self, "weight_decay", _DEFAULT_WEIGHT_DECAY[self.name])
        if not (math.isfinite(self.lr) and self.lr >= 0.0):
            raise ValueError(f"OptimSpec.lr must be finite and >= 0, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"OptimSpec.momentum must be in [0, 1), got {self.momentum}")
        if self.name != "sgd" and self.momentum != 0.0:
            raise ValueError(
                f"OptimSpec.momentum applies to sgd only (got {self.momentum} for "
                f"{self.name}); Adam's momentum is betas[0]"
            )
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"OptimSpec.betas must be two values in [0, 1), got {self.betas}")
        if not (math.isfinite(self.eps) and self.eps >= 0.0):
            raise ValueError(f"OptimSpec.eps must be finite and >= 0, got {self.eps}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0.0):
            raise ValueError(
                f"OptimSpec.weight_decay must be finite and >= 0, got {self.weight_decay}"
            )


@dataclass
class OptState:
    """Optimizer state of one simulation.

    Attributes:
        step: Number of steps taken so far (0 for a fresh state).
        buffers: Per-parameter state tensors by name, each list aligned with the parameters and
            each tensor shaped like its parameter: "momentum_buffer" (SGD with momentum),
            "exp_avg" and "exp_avg_sq" (Adam/AdamW). Empty for plain SGD.
    """

    step: int
    buffers: dict[str, list[Tensor]] = field(default_factory=dict)

    def tensors(self) -> list[Tensor]:
        """All state tensors, buffer by buffer in sorted name order, then parameter order."""
        return [t for name in sorted(self.buffers) for t in self.buffers[name]]

    def with_tensors(self, tensors: list[Tensor]) -> OptState:
        """A state with the same step and layout holding ``tensors`` (ordered as
        :meth:`tensors`)."""
        n = sum(len(v) for v in self.buffers.values())
        if len(tensors) != n:
            raise ValueError(f"OptState.with_tensors: expected {n} tensors, got {len(tensors)}")
        out, i = {}, 0
        for name in sorted(self.buffers):
            k = len(self.buffers[name])
            out[name] = list(tensors[i : i + k])
            i += k
        return replace(self, buffers=out)

    def clone(self) -> OptState:
        """A detached deep copy (a snapshot that later in-place steps leave untouched)."""
        return replace(
            self, buffers={k: [t.detach().clone() for t in v] for k, v in self.buffers.items()}
        )


def init_state(spec: OptimSpec, params: list[Tensor]) -> OptState:
    """Fresh state: step 0 and zero buffers shaped like ``params``.

    Args:
        spec: The optimizer.
        params: Parameters, any shapes.

    Returns:
        A new :class:`OptState` sharing nothing with any earlier simulation.
    """

    def zeros() -> list[Tensor]:
        return [torch.zeros_like(p, memory_format=torch.preserve_format).detach() for p in params]

    if spec.name == "sgd":
        return OptState(0, {"momentum_buffer": zeros()} if spec.momentum != 0.0 else {})
    return OptState(0, {"exp_avg": zeros(), "exp_avg_sq": zeros()})


def _check(spec: OptimSpec, params: list[Tensor], grads: list[Tensor], state: OptState) -> None:
    if len(params) != len(grads):
        raise ValueError(f"got {len(params)} params but {len(grads)} grads")
    for name, bufs in state.buffers.items():
        if len(bufs) != len(params):
            raise ValueError(
                f"state buffer {name!r} has {len(bufs)} tensors for {len(params)} params"
            )
    expected = set(init_state(spec, []).buffers)
    if set(state.buffers) != expected:
        raise ValueError(
            f"state buffers {sorted(state.buffers)} do not fit {spec.name} "
            f"(momentum={spec.momentum}); use init_state(spec, params)"
        )


def _sqrt_safe(x: Tensor) -> Tensor:
    """sqrt(x) with value sqrt(x) exactly and derivative 0 (not inf) where x == 0.

    A parameter whose gradients have all been exactly zero (LoRA A while B == 0, say) has
    exp_avg == exp_avg_sq == 0, where autograd's d sqrt would give 0 * inf = NaN. NaN inputs stay
    NaN.
    """
    pos = x > 0
    return torch.where(pos, torch.where(pos, x, torch.ones_like(x)).sqrt(), x * 0)


def step(
    spec: OptimSpec, params: list[Tensor], grads: list[Tensor], state: OptState
) -> tuple[list[Tensor], OptState]:
    """One optimizer step, pure and differentiable.

    Args:
        spec: The optimizer.
        params: Parameters, list of tensors of any shapes.
        grads: Gradients, shaped like ``params``.
        state: State before the step (from :func:`init_state` or an earlier step).

    Returns:
        (new_params, new_state): fresh tensors shaped like ``params``; the inputs are not modified.
        When the inputs require grad the outputs carry a graph back to params, grads and state.
    """
    _check(spec, params, grads, state)
    t = state.step + 1
    lr, wd = spec.lr, spec.weight_decay
    new_params: list[Tensor] = []
    if spec.name == "sgd":
        bufs: list[Tensor] = []
        for i, (p, g) in enumerate(zip(params, grads)):
            if wd != 0:
                g = g.add(p, alpha=wd)
            if spec.momentum != 0:
                # torch.optim: the first buffer is the gradient itself, later ones mu * b + g.
                g = g if t == 1 else state.buffers["momentum_buffer"][i].mul(spec.momentum).add(g)
                bufs.append(g)
            new_params.append(p.add(g, alpha=-lr))
        new_state = OptState(t, {"momentum_buffer": bufs} if spec.momentum != 0 else {})
        return new_params, new_state

    beta1, beta2 = spec.betas
    bias_correction1 = 1 - beta1 ** float(t)
    bias_correction2_sqrt = (1 - beta2 ** float(t)) ** 0.5
    step_size = lr / bias_correction1
    exp_avgs, exp_avg_sqs = [], []
    for i, (p, g) in enumerate(zip(params, grads)):
        if wd != 0:
            if spec.name == "adamw":
                p = p.mul(1 - lr * wd)
            else:
                g = g.add(p, alpha=wd)
        m = torch.lerp(state.buffers["exp_avg"][i], g, 1 - beta1)
        v = state.buffers["exp_avg_sq"][i].mul(beta2).addcmul(g, g, value=1 - beta2)
        denom = (_sqrt_safe(v) / bias_correction2_sqrt).add(spec.eps)
        new_params.append(p.addcdiv(m, denom, value=-step_size))
        exp_avgs.append(m)
        exp_avg_sqs.append(v)
    return new_params, OptState(t, {"exp_avg": exp_avgs, "exp_avg_sq": exp_avg_sqs})


@torch.no_grad()
def step_ref_(spec: OptimSpec, params: list[Tensor], grads: list[Tensor], state: OptState) -> None:
    """Plain-torch in-place step: the reference of :func:`step_` (same arguments, same effect),
    :func:`step_` on the torch references of ``resalign_fast.ops.optim_step``."""
    step_(spec, params, grads, state, backend="torch")


def _flat(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """1-D views when every tensor is contiguous (what the fused kernels take), else unchanged
    (the dispatcher then refuses the kernels and runs its torch reference, which takes any
    shape)."""
    if all(t is None or t.is_contiguous() for t in tensors):
        return tuple(None if t is None else t.view(-1) for t in tensors)
    return tensors


def step_(
    spec: OptimSpec,
    params: list[Tensor],
    grads: list[Tensor],
    state: OptState,
    *,
    backend: str = "auto",
) -> None:
    """One optimizer step in place under ``no_grad`` (the no-graph simulation's fast path).

    Each tensor goes through ``resalign_fast.ops.optim_step`` (``adam_step`` / ``sgd_step``, fused
    C++/CUDA/Triton kernels with a torch reference).

    Args:
        spec: The optimizer.
        params: Parameters, updated in place (leaves that require grad are allowed).
        grads: Gradients shaped like ``params``; not modified.
        state: Updated in place (``state.step`` incremented, buffers overwritten).
        backend: Passed to the fused ops: "auto" (the first that can run each tensor) or a backend
            name ("cuda", "triton", "cpp", "torch"), which raises if it cannot run.

    Raises:
        ValueError: mismatched inputs, or a named backend that cannot run.
    """
    _check(spec, params, grads, state)
    t = state.step + 1
    wd = spec.weight_decay
    with torch.no_grad():
        if spec.name == "sgd":
            bufs = state.buffers.get("momentum_buffer", [None] * len(params))
            for p, g, b in zip(params, grads, bufs):
                p1, g1, b1 = _flat(p, g, b)
                optim_step.sgd_step(
                    p1,
                    g1,
                    b1,
                    lr=spec.lr,
                    momentum=spec.momentum,
                    weight_decay=wd,
                    first_step=t == 1,
                    backend=backend,
                )
        else:
            beta1, beta2 = spec.betas
            for p, g, m, v in zip(
                params, grads, state.buffers["exp_avg"], state.buffers["exp_avg_sq"]
            ):
                p1, g1, m1, v1 = _flat(p, g, m, v)
                optim_step.adam_step(
                    p1,
                    g1,
                    m1,
                    v1,
                    step=t,
                    lr=spec.lr,
                    beta1=beta1,
                    beta2=beta2,
                    eps=spec.eps,
                    weight_decay=wd,
                    decoupled=spec.name == "adamw",
                    backend=backend,
                )
    state.step = t
