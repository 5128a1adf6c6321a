"""Linear solvers for the proximal system (I + gamma H) v = b.

All solvers share one convention: vectors are lists of tensors (one per parameter tensor, any
shapes), and ``hvp(v: list[Tensor]) -> list[Tensor]`` returns H v with the same shapes. H is the
Hessian of the fine-tuning loss at theta*, so it is symmetric; the solvers never form it.

Cost is counted in HVP calls, the expensive part (one or two UNet backward passes each):

* ``richardson_solve(iters=K)``: K iterations from v_0 = 0, K - 1 HVPs (H v_0 = 0 is skipped).
* ``neumann_solve(iters=K)``: the Neumann series with K + 1 terms, K HVPs. It is the same
  polynomial in H as Richardson with K + 1 iterations, accumulated term by term.
* ``cg_solve(iters=K)``: K conjugate-gradient iterations, K HVPs; needs I + gamma H positive
  definite.

``make_solver(name, **kw)`` returns ``solver(hvp, b)`` with the keywords bound (torchopt style).
The Richardson update runs through the fused op ``resalign_fast.ops.richardson_step`` (one pass
per parameter tensor, also returning the squared update norm the guard needs).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from resalign_fast.hypergrad.vec import dot, norm_sq
from resalign_fast.ops.richardson_step import richardson_step

HVP = Callable[[list[Tensor]], list[Tensor]]
Solver = Callable[[HVP, Sequence[Tensor]], list[Tensor]]

__all__ = ["richardson_solve", "cg_solve", "neumann_solve", "make_solver"]


def _flat(t: Tensor) -> Tensor:
    return t.contiguous().view(-1)


def _check(b: Sequence[Tensor], iters: int) -> list[Tensor]:
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    b = list(b)
    if not b:
        raise ValueError("b is an empty list of tensors")
    return [x.detach() for x in b]


def _hvp_checked(hvp: HVP, v: list[Tensor]) -> list[Tensor]:
    hv = list(hvp(v))
    if len(hv) != len(v):
        raise ValueError(f"hvp returned {len(hv)} tensors for {len(v)} inputs")
    return hv


@dataclass
class SolveTrace:
    """Per-iteration figures recorded by the guarded solvers.

    Attributes:
        step_norms: ||dv_k|| for each update (Richardson) or ||p_k|| for each series term (Neumann).
        ratios: consecutive ratios step_norms[k + 1] / step_norms[k] (0 when the previous is 0).
        hvps: number of HVP calls made.
        diverged: True when a ratio exceeded 1 or a value was not finite (the solve stopped there).
    """

    step_norms: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    hvps: int = 0
    diverged: bool = False

    def push(self, norm: float, stop_on_growth: bool) -> bool:
        """Record a step norm; return True when the solve must stop (growth or non-finite)."""
        if self.step_norms:
            prev = self.step_norms[-1]
            self.ratios.append(norm / prev if prev > 0 else (0.0 if norm == 0 else math.inf))
        self.step_norms.append(norm)
        if not math.isfinite(norm) or (self.ratios and not math.isfinite(self.ratios[-1])):
            self.diverged = True
        elif stop_on_growth and self.ratios and self.ratios[-1] > 1.0:
            self.diverged = True
        return self.diverged


def richardson_trace(
    hvp: HVP,
    b: Sequence[Tensor],
    *,
    alpha: float = 1.0,
    gamma: float = 1.0,
    iters: int = 5,
    stop_on_growth: bool = False,
) -> tuple[list[Tensor], SolveTrace]:
    """Richardson iteration with per-step update norms (used by the guard).

    v_0 = 0; v_{k+1} = v_k + alpha (b - v_k - gamma H v_k). Since v_0 = 0, v_1 = alpha b needs no
    HVP. The updates obey dv_{k+1} = (I - alpha (I + gamma H)) dv_k, so ||dv_{k+1}|| / ||dv_k||
    estimates the contraction factor of the iteration (see ``guard.py``).

    Args:
        hvp: v -> H v on lists of tensors.
        b: right-hand side, list of tensors of any shapes.
        alpha: step size.
        gamma: proximal weight.
        iters: number of iterations K (K - 1 HVP calls).
        stop_on_growth: stop as soon as an update is longer than the previous one.

    Returns:
        (v_K, trace); v_K has the shapes of b. When the solve stopped early, v is the last iterate.
    """
    b = _check(b, iters)
    trace = SolveTrace()
    if iters == 0:
        return [torch.zeros_like(x) for x in b], trace
    v = [alpha * x for x in b]
    if trace.push(math.sqrt(norm_sq(v)), stop_on_growth):
        return v, trace
    for _ in range(iters - 1):
        hv = _hvp_checked(hvp, v)
        trace.hvps += 1
        upd_sq = []
        for i, (vi, bi) in enumerate(zip(v, b)):
            # tensor by tensor, dropping H v_i and the old v_i as soon as v_i is replaced: live
            # full-size vectors are b, v and H v, not b, v, H v and the new v
            hi, hv[i] = _flat(hv[i].detach().to(vi.dtype)), None
            vn, usq, _ = richardson_step(_flat(vi), _flat(bi), hi, alpha, gamma)
            v[i] = vn.view(vi.shape)
            upd_sq.append(usq.double())
            del vi, hi
        del hv
        # one host sync per iteration, not one per parameter tensor
        if trace.push(math.sqrt(float(torch.stack(upd_sq).sum())), stop_on_growth):
            break
    return v, trace


def richardson_solve(
    hvp: HVP, b: Sequence[Tensor], *, alpha: float = 1.0, gamma: float = 1.0, iters: int = 5
) -> list[Tensor]:
    """Approximately solve (I + gamma H) v = b by K Richardson iterations from v_0 = 0.

    v_K = alpha * sum_{j<K} (I - alpha (I + gamma H))^j b. Converges when
    |1 - alpha (1 + gamma h)| < 1 for every eigenvalue h of H.

    Args:
        hvp: v -> H v on lists of tensors.
        b: right-hand side, list of tensors of any shapes.
        alpha: step size.
        gamma: proximal weight.
        iters: number of iterations K (K - 1 HVP calls).

    Returns:
        v_K, a list of tensors shaped like b.
    """
    return richardson_trace(hvp, b, alpha=alpha, gamma=gamma, iters=iters)[0]


def neumann_trace(
    hvp: HVP,
    b: Sequence[Tensor],
    *,
    alpha: float = 1.0,
    gamma: float = 1.0,
    iters: int = 5,
    stop_on_growth: bool = False,
) -> tuple[list[Tensor], SolveTrace]:
    """Truncated Neumann series with per-term norms (see ``neumann_solve``)."""
    b = _check(b, iters)
    trace = SolveTrace()
    p = list(b)
    s = [x.clone() for x in b]
    if not trace.push(math.sqrt(norm_sq(p)), stop_on_growth):
        for _ in range(iters):
            hp = _hvp_checked(hvp, p)
            trace.hvps += 1
            p = [pi - alpha * (pi + gamma * hi.detach()) for pi, hi in zip(p, hp)]
            s = [si + pi for si, pi in zip(s, p)]
            if trace.push(math.sqrt(norm_sq(p)), stop_on_growth):
                break
    return [alpha * si for si in s], trace


def neumann_solve(
    hvp: HVP, b: Sequence[Tensor], *, alpha: float = 1.0, gamma: float = 1.0, iters: int = 5
) -> list[Tensor]:
    """Approximately solve (I + gamma H) v = b by a truncated Neumann series.

    v = alpha * sum_{j=0}^{K} (I - alpha (I + gamma H))^j b, computed as p_0 = b,
    p_{j+1} = p_j - alpha (p_j + gamma H p_j). Same convergence condition as Richardson.

    Args:
        hvp: v -> H v on lists of tensors.
        b: right-hand side, list of tensors of any shapes.
        alpha: step size (scaling of the series).
        gamma: proximal weight.
        iters: number of HVP calls K (K + 1 series terms).

    Returns:
        v, a list of tensors shaped like b.
    """
    return neumann_trace(hvp, b, alpha=alpha, gamma=gamma, iters=iters)[0]


def cg_solve(
    hvp: HVP, b: Sequence[Tensor], *, gamma: float = 1.0, iters: int = 5, tol: float = 0.0
) -> list[Tensor]:
    """Conjugate gradients on (I + gamma H) v = b from v_0 = 0.

    Requires I + gamma H symmetric positive definite (H may be indefinite if gamma |h_min| < 1).

    Args:
        hvp: v -> H v on lists of tensors.
        b: right-hand side, list of tensors of any shapes.
        gamma: proximal weight.
        iters: maximum number of iterations (one HVP each).
        tol: stop when ||b - (I + gamma H) v|| <= tol * ||b|| (0 runs all iterations).

    Returns:
        v, a list of tensors shaped like b.

    Raises:
        ValueError: when a search direction has non-positive curvature (system not positive
            definite) or a non-finite value appears.
    """
    b = _check(b, iters)
    x = [torch.zeros_like(t) for t in b]
    r = list(b)
    p = list(b)
    rs = dot(r, r)
    stop = (tol * tol) * rs
    for _ in range(iters):
        if rs <= stop or rs == 0:
            break
        hp = _hvp_checked(hvp, p)
        ap = [pi + gamma * hi.detach() for pi, hi in zip(p, hp)]
        curv = dot(p, ap)
        if not math.isfinite(curv) or curv <= 0:
            raise ValueError(
                f"cg_solve: p^T (I + gamma H) p = {curv:.3g} is not positive; the system "
                "is not positive definite (use richardson with a smaller alpha or a smaller gamma)"
            )
        a = rs / curv
        x = [xi + a * pi for xi, pi in zip(x, p)]
        r = [ri - a * api for ri, api in zip(r, ap)]
        rs_new = dot(r, r)
        p = [ri + (rs_new / rs) * pi for ri, pi in zip(r, p)]
        rs = rs_new
    return x


_SOLVERS: dict[str, tuple[Callable[..., list[Tensor]], frozenset[str]]] = {
    "richardson": (richardson_solve, frozenset({"alpha", "gamma", "iters"})),
    "neumann": (neumann_solve, frozenset({"alpha", "gamma", "iters"})),
    "cg": (cg_solve, frozenset({"gamma", "iters", "tol"})),
}


def make_solver(name: str, **kw: float | int) -> Solver:
    """Return ``solver(hvp, b)`` for ``name`` in {"richardson", "cg", "neumann"} with ``kw`` bound.

    Args:
        name: solver name.
        **kw: keywords of that solver (richardson/neumann: alpha, gamma, iters; cg: gamma, iters,
            tol).

    Returns:
        A callable ``solver(hvp, b) -> list[Tensor]``.

    Raises:
        ValueError: unknown name or a keyword the solver does not take.
    """
    if name not in _SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(_SOLVERS)}")
    fn, allowed = _SOLVERS[name]
    bad = sorted(set(kw) - allowed)
    if bad:
        raise ValueError(f"solver {name!r} takes {sorted(allowed)}, not {bad}")
    return functools.partial(fn, **kw)
