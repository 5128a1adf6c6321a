"""The reference guard around the hypergradient solve (METHOD.md, Algorithm 1).

g = direct + v_K, v_K ~ (I + gamma H)^-1 b. An attempt is rejected when

1. the iteration diverges: an update is longer than the previous one,
   ||dv_{k+1}|| / ||dv_k|| > 1, or a value is not finite; or
2. ||g|| > max_grad_norm.

A rejected attempt halves alpha and retries, at most ``max_retries`` times; then g = direct
(the first-order gradient). Every retry and the fallback are logged (logger
"resalign_fast.hypergrad", level WARNING).

Why the update-norm ratio. Richardson updates satisfy dv_{k+1} = M dv_k with
M = I - alpha (I + gamma H), dv_1 = alpha b, so dv_k = M^{k-1} alpha b. M is symmetric, so by
Cauchy-Schwarz ||M^k x||^2 = <M^{k-1} x, M^{k+1} x> <= ||M^{k-1} x|| ||M^{k+1} x||: the ratios
||dv_{k+1}|| / ||dv_k|| never decrease and tend to the spectral radius of M restricted to the
components of b. A ratio above 1 at any step therefore proves that the iteration diverges on b
(some |1 - alpha (1 + gamma h)| > 1) and every further HVP would be wasted, so the attempt stops
there. The iterate norm ||v_k|| is not a usable test: it grows from v_0 = 0 towards the solution
in every convergent run. The Neumann solver is tested the same way on its terms p_k = M^k b.
CG has no step size, so a CG failure (non-positive curvature, non-finite values, or ||g|| too
large) falls back at once without retries.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import Tensor

from resalign_fast.hypergrad.solvers import cg_solve, neumann_trace, richardson_trace
from resalign_fast.hypergrad.vec import norm

logger = logging.getLogger("resalign_fast.hypergrad")

__all__ = ["GuardInfo", "guarded_hypergrad"]


@dataclass
class GuardInfo:
    """What the guard did.

    Attributes:
        retries: number of times alpha was halved and the solve repeated.
        fallback: True when g is the direct gradient because every attempt was rejected.
        alpha_used: alpha of the accepted attempt (of the last attempt on fallback).
        grad_norm: ||g|| of the returned gradient.
        direct_norm: ||direct||.
        v_norm: ||v_K|| of the accepted solve (0 on fallback).
        rel_residual: ||b - (I + gamma H) v_{K-1}|| / ||b|| for Richardson, i.e. ||dv_K|| /
            (alpha ||b||), free from the last update (Neumann: ||p_K|| / ||b||, the residual of
            the partial sum without its last term; CG: nan). For the last attempt.
        max_ratio: largest update-norm ratio of the last attempt (nan when fewer than 2 updates).
        hvps: HVP calls over all attempts.
        reasons: why each rejected attempt was rejected.
    """

    retries: int = 0
    fallback: bool = False
    alpha_used: float = 1.0
    grad_norm: float = 0.0
    direct_norm: float = 0.0
    v_norm: float = 0.0
    rel_residual: float = math.nan
    max_ratio: float = math.nan
    hvps: int = 0
    reasons: list[str] = field(default_factory=list)


def _attempt(
    solver: str,
    hvp: Callable[[list[Tensor]], list[Tensor]],
    b: list[Tensor],
    alpha: float,
    gamma: float,
    iters: int,
    info: GuardInfo,
) -> tuple[list[Tensor] | None, str]:
    """One solve; returns (v, "") or (None or v, reason for rejection)."""
    bn = norm(b)
    if solver == "cg":
        calls = [0]

        def counted(v: list[Tensor]) -> list[Tensor]:
            calls[0] += 1
            return hvp(v)

        try:
            v = cg_solve(counted, b, gamma=gamma, iters=iters)
        except ValueError as err:
            return None, str(err)
        finally:
            info.hvps += calls[0]
        info.rel_residual, info.max_ratio = math.nan, math.nan
        return v, "" if math.isfinite(norm(v)) else "non-finite solution"
    trace_fn = richardson_trace if solver == "richardson" else neumann_trace
    v, tr = trace_fn(hvp, b, alpha=alpha, gamma=gamma, iters=iters, stop_on_growth=True)
    info.hvps += tr.hvps
    info.max_ratio = max(tr.ratios) if tr.ratios else math.nan
    last = tr.step_norms[-1] if tr.step_norms else 0.0
    scale = alpha * bn if solver == "richardson" else bn
    info.rel_residual = last / scale if scale > 0 else 0.0
    if tr.diverged:
        k = len(tr.ratios)
        r = tr.ratios[-1] if tr.ratios else math.nan
        return None, f"diverged at update {k + 1} (norm ratio {r:.3g} > 1 or non-finite)"
    return v, ""


def guarded_hypergrad(
    direct: Sequence[Tensor],
    b: Sequence[Tensor],
    hvp: Callable[[list[Tensor]], list[Tensor]],
    *,
    alpha: float = 1.0,
    gamma: float = 1.0,
    iters: int = 5,
    max_grad_norm: float | None = 0.2,
    max_retries: int = 5,
    solver: str = "richardson",
    pullback: Callable[[list[Tensor]], list[Tensor]] | None = None,
) -> tuple[list[Tensor], GuardInfo]:
    """g = direct + v_K with v_K ~ (I + gamma H)^-1 b, guarded as in the reference code.

    Args:
        direct: first-order terms, e.g. (1 - lambda) grad L_h(theta) + w_r grad R(theta); list of
            tensors.
        b: right-hand side lambda grad L_h(theta*), shaped like direct.
        hvp: v -> H v, H the Hessian of the fine-tuning loss at theta*.
        alpha: initial Richardson / Neumann step (halved on each retry).
        gamma: proximal weight.
        iters: solver iterations.
        max_grad_norm: reject when ||g|| exceeds it (None: no norm check).
        max_retries: how many times alpha may be halved before falling back.
        solver: "richardson", "neumann" or "cg" (cg: no retries, see the module docstring).
        pullback: maps the solution v from the fine-tuning space (where b, H live) to the space of
            direct, e.g. the vector-Jacobian product of theta -> merged full weights; None when the
            two spaces coincide.

    Returns:
        (g, info): g a list of detached tensors shaped like direct; info a ``GuardInfo``.

    Raises:
        ValueError: bad solver name, mismatched lists, negative max_retries, or a non-finite
            direct gradient (an upstream NaN/inf, which no retry can fix).
    """
    if solver not in ("richardson", "neumann", "cg"):
        raise ValueError(f"unknown solver {solver!r}; choose richardson, neumann or cg")
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}")
    direct = [d.detach() for d in direct]
    b = [x.detach() for x in b]
    if pullback is None and (
        len(direct) != len(b) or any(d.shape != x.shape for d, x in zip(direct, b))
    ):
        raise ValueError(
            "direct and b must be lists of tensors with the same shapes (or give pullback)"
        )
    info = GuardInfo(direct_norm=norm(direct), alpha_used=alpha)
    if not math.isfinite(info.direct_norm):
        raise ValueError("guarded_hypergrad: the direct gradient is not finite")
    a = alpha
    tries = 1 if solver == "cg" else max_retries + 1
    for attempt in range(tries):
        info.alpha_used = a
        v, reason = _attempt(solver, hvp, b, a, gamma, iters, info)
        if v is not None and not reason:
            pv = v if pullback is None else [x.detach() for x in pullback(v)]
            g = [d + x.to(d.dtype) for d, x in zip(direct, pv)]
            gn = norm(g)
            if not math.isfinite(gn):
                reason = "non-finite hypergradient"
            elif max_grad_norm is not None and gn > max_grad_norm:
                reason = f"||g|| = {gn:.4g} > max_grad_norm = {max_grad_norm:.4g}"
            else:
                info.grad_norm, info.v_norm = gn, norm(pv)
                return g, info
        info.reasons.append(reason)
        if attempt + 1 < tries:
            info.retries += 1
            logger.warning(
                "hypergrad retry %d/%d: %s; alpha %.4g -> %.4g",
                info.retries,
                max_retries,
                reason,
                a,
                a / 2,
            )
            a /= 2
    info.fallback = True
    info.grad_norm, info.v_norm = info.direct_norm, 0.0
    logger.warning(
        "hypergrad fallback to the direct gradient after %d retries "
        "(%s solver, last alpha %.4g): %s",
        info.retries,
        solver,
        a,
        info.reasons[-1],
    )
    return [d.clone() for d in direct], info
