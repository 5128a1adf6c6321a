"""The stable guard: a Richardson solve that converges without retries and keeps its signal.

The reference guard (guard.py) starts Richardson at v_0 = 0 with alpha = 1, halves alpha when the
iteration diverges and, after five halvings, drops the whole resilience term (g = direct). On the
digits world gamma x (top curvature) is about 100 for every full-parameter configuration, so it
spends 4-24 HVPs and then falls back on almost half of the configurations (RESILIENCE_DIAGNOSIS.md).

This guard departs from it in three ways (docs/configuration.md, "guard"):

1. Step from the curvature. A few power-iteration HVPs estimate the dominant eigenvalue mu of H
   (warm-started from the previous outer step's eigenvector when one is given), and
   alpha = 1 / (1 + gamma * SAFETY * |mu|), so that alpha (1 + gamma h) lies in (0, 2) for every
   eigenvalue h with |h| <= SAFETY |mu|: no retry is needed. When 1 + gamma * SAFETY * mu <= 0
   (negative curvature beyond -1/gamma) the system is not positive definite and the solve is not
   attempted.
2. Start at the first-order answer, v_0 = b. (I + gamma H)^-1 b equals b in the flat directions of
   H, where a small alpha would barely move v from 0 in K iterations; from v_0 = b those directions
   are already right and the stiff ones contract fastest.
3. Fall back to the first-order resilience term. When the solve fails (non-positive system, a
   growing residual, or a non-finite value) v = b: g = direct + pullback(b), the first-order
   hypergradient, not the direct gradient. No max_grad_norm test: AdamW normalises the step, and
   the reference test rejected correct hypergradients.

Residuals r_k = b - (I + gamma H) v_k obey r_{k+1} = M r_k with M = I - alpha (I + gamma H)
symmetric, so (guard.py, Cauchy-Schwarz) their norm ratios never decrease: one ratio above 1
proves divergence and the solve stops there. Cost: power_iters (cold) or 1 (warm) + iters HVPs, no
retries.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from resalign_fast.hypergrad.guard import GuardInfo
from resalign_fast.hypergrad.vec import dot, norm
from resalign_fast.inner.inplace import host_backup

logger = logging.getLogger("resalign_fast.hypergrad")

__all__ = ["SAFETY", "power_iteration", "stable_hypergrad", "stable_solve"]

# Power iteration approaches |mu_max| from below; 1.5 leaves room for a 33% underestimate. Measured
# (fp64, 200 eigenvalues spread evenly over [0, 100], random start, 5 trials): 2 iterations reach
# 0.71-0.77 of the top eigenvalue, 3 reach 0.82-0.85, 5 reach 0.90-0.92. Network Hessians have a
# few outlying eigenvalues, where the iteration converges faster, and warm starts help further.
SAFETY = 1.5

# A residual ratio above 1 proves divergence in exact arithmetic; GROWTH > 1 keeps rounding noise
# (ratios of 1.02 were seen at the fp64 rounding floor) from failing a converged solve.
GROWTH = 1.05


def power_iteration(
    hvp: Callable[[list[Tensor]], list[Tensor]], start: Sequence[Tensor], iters: int
) -> tuple[float, list[Tensor], int]:
    """Dominant eigenvalue of H (largest |h|, signed) by power iteration.

    Args:
        hvp: v -> H v on lists of tensors.
        start: starting vector (any non-zero list of tensors; the previous eigenvector warm-starts).
        iters: HVP calls (>= 1).

    Returns:
        (mu, u, hvps): the Rayleigh quotient u^T H u of the last unit vector u, u itself, HVP calls.
        mu is nan when a value was not finite or the start was zero.
    """
    n = norm(start)
    if not (n > 0 and math.isfinite(n)):
        return math.nan, [torch.zeros_like(x) for x in start], 0
    u = [x.detach() / n for x in start]
    del start  # full-size vectors alive: u and H u only
    mu, calls = math.nan, 0
    for _ in range(max(1, iters)):
        hu = [_own(h.detach().to(x.dtype), x) for h, x in zip(hvp(u), u)]
        calls += 1
        mu = dot(u, hu)
        hn = norm(hu)
        if not (math.isfinite(hn) and math.isfinite(mu)):
            return math.nan, u, calls
        if hn == 0:
            return 0.0, u, calls
        u = [h.div_(hn) for h in hu]
        del hu
    return mu, u, calls


def stable_hypergrad(
    direct: Sequence[Tensor],
    b: Sequence[Tensor],
    hvp: Callable[[list[Tensor]], list[Tensor]],
    *,
    gamma: float = 1.0,
    iters: int = 5,
    power_iters: int = 3,
    warm: Sequence[Tensor] | None = None,
    pullback: Callable[[list[Tensor]], list[Tensor]] | None = None,
    device: torch.device | None = None,
) -> tuple[list[Tensor], GuardInfo, list[Tensor]]:
    """g = direct + pullback(v), v ~ (I + gamma H)^-1 b by Richardson from v_0 = b at a step from
    the measured curvature; on failure v = b (first order). See the module docstring.

    Args:
        direct: first-order terms (1 - lambda) grad L_h(theta) + w_r grad R(theta); list of tensors.
        b: lambda grad L_h(theta*), in the fine-tuning space.
        hvp: v -> H v, H the Hessian of the fine-tuning loss at theta*.
        gamma: proximal weight (0: the first-order hypergradient, no HVP).
        iters: Richardson iterations K (K HVPs).
        power_iters: power-iteration HVPs for the step size from a cold start (b); one from `warm`.
        warm: start of the power iteration (the previous eigenvector in this space), else b.
        pullback: fine-tuning space -> theta's space (None: the same space).
        device: where the solve's vectors live (the HVP's device). None: b's own device. When given,
            b may wait in host memory: it is read one tensor at a time (the lean full-parameter
            path, where every full-size vector on the device counts), and u is returned there too.

    Returns:
        (g, info, u): g detached, shaped like direct; info.fallback True when the first-order term
        was used; info.alpha_used the step; u the eigenvector estimate (to warm-start the next
        call).
    """
    direct = [d.detach() for d in direct]
    b = [x.detach() for x in b]
    info = GuardInfo(direct_norm=norm(direct), alpha_used=math.nan)
    if not math.isfinite(info.direct_norm):
        raise ValueError("stable_hypergrad: the direct gradient is not finite")

    v, u = stable_solve(
        hvp,
        b,
        gamma=gamma,
        iters=iters,
        power_iters=power_iters,
        warm=warm,
        device=device,
        info=info,
    )
    if info.fallback:
        logger.debug("stable guard: first-order resilience term (%s)", info.reasons[-1])
    pv = v if pullback is None else [x.detach() for x in pullback(v)]
    g = [d + x.to(d.dtype) for d, x in zip(direct, pv)]
    info.grad_norm, info.v_norm = norm(g), norm(pv)
    return g, info, u


def stable_solve(
    hvp: Callable[[list[Tensor]], list[Tensor]],
    b: Sequence[Tensor],
    *,
    gamma: float,
    iters: int,
    power_iters: int = 3,
    warm: Sequence[Tensor] | None = None,
    device: torch.device | None = None,
    info: GuardInfo | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """The stable guard's solve, v ~ (I + gamma H)^-1 b (arguments as `stable_hypergrad`): the step
    from power iteration, Richardson from v_0 = b, v = b on failure (info.fallback, info.reasons).

    Returns:
        (v, u): v on `device` (b's when None); u the eigenvector estimate (in b's memory when
        `device` is given, else on the device; b itself when no HVP ran).
    """
    info = GuardInfo(direct_norm=math.nan, alpha_used=math.nan) if info is None else info
    b = [x.detach() for x in b]

    def on_device(xs: Sequence[Tensor]) -> list[Tensor]:
        return list(xs) if device is None else [x.to(device, non_blocking=True) for x in xs]

    v, u = None, list(b)
    if gamma > 0 and iters > 0:
        is_warm = warm is not None and len(warm) == len(b) and norm(warm) > 0
        # a warm start is already close to the eigenvector: one HVP refreshes the estimate
        mu, u, info.hvps = power_iteration(
            hvp, on_device(warm if is_warm else b), 1 if is_warm else power_iters
        )
        if device is not None:  # the caller keeps u between outer steps: it waits in host memory
            u = host_backup(u)
        lo = 1 + gamma * SAFETY * min(
            mu, 0.0
        )  # the smallest eigenvalue of I + gamma H we allow for
        if not math.isfinite(mu):
            info.reasons.append("power iteration: non-finite value")
        elif lo <= 0:
            info.reasons.append(
                f"I + gamma H not positive definite (gamma * mu = {gamma * mu:.3g})"
            )
        else:
            a = 1.0 / (1 + gamma * SAFETY * abs(mu))
            info.alpha_used = a
            v, reason = _richardson_from_b(hvp, b, a, gamma, iters, info, device)
            if reason:
                info.reasons.append(reason)
        info.fallback = bool(info.reasons)
    if v is None or info.fallback:
        v = on_device(b)
    return v, u


def _own(h: Tensor, *others: Tensor) -> Tensor:
    """h, or a copy when it shares storage with one of `others` (an HVP may return its input).
    Storages are compared by identity (`_cdata`), which also holds for meta tensors (the planner's),
    whose data pointers are all 0."""
    key = h.untyped_storage()._cdata
    return h.clone() if any(o.untyped_storage()._cdata == key for o in others) else h


def _richardson_from_b(
    hvp,
    b: list[Tensor],
    alpha: float,
    gamma: float,
    iters: int,
    info: GuardInfo,
    device: torch.device | None = None,
) -> tuple[list[Tensor] | None, str]:
    """K Richardson updates from v_0 = b (a copy on `device`, None: b's); returns (v_K, "") or
    (None, why it failed). In place: the residual overwrites the HVP's output and v is updated in
    place, so the full-size vectors alive are v, H v and b (which may wait in host memory)."""
    v = [x.to(device or x.device, copy=True) for x in b]
    bn = norm(b)
    prev = 0.0
    for k in range(iters):
        hv = hvp(v)
        info.hvps += 1
        with torch.no_grad():  # r = b - v - gamma H v, in H v's storage (never in v's or b's)
            r = [
                _own(h.detach().to(vi.dtype), vi, bi)
                .mul_(-gamma)
                .add_(bi.to(vi.device, non_blocking=True))
                .sub_(vi)
                for bi, vi, h in zip(b, v, hv)
            ]
        del hv
        rn = norm(r)
        info.rel_residual = rn / bn if bn > 0 else 0.0
        if not math.isfinite(rn):
            return None, f"non-finite residual at iteration {k + 1}"
        if k > 0 and prev > 0:
            ratio = rn / prev
            info.max_ratio = ratio if math.isnan(info.max_ratio) else max(info.max_ratio, ratio)
            if ratio > GROWTH:
                return None, f"residual grew at iteration {k + 1} (ratio {ratio:.3g} > {GROWTH})"
        if rn <= 100 * torch.finfo(b[0].dtype).eps * bn:  # converged to rounding
            break
        prev = rn
        with torch.no_grad():
            for vi, ri in zip(v, r):
                vi.add_(ri, alpha=alpha)
        del r
    return v, ""
