"""Hessian-vector-product backends: ``make_hvp(loss_fn, params, backend=...) -> hvp``.

Backends (all give H v for H = Hessian of ``loss_fn`` at ``params``):

* ``exact``: reverse-over-reverse. One gradient with ``create_graph=True`` at construction, then
  ``autograd.grad(g, params, v)`` per call. Exact to rounding; keeps the double-backward graph
  alive (the memory cost of the reference code), and needs double-backward-capable attention.
* ``jvp``: forward-over-reverse, ``torch.func.jvp(torch.func.grad(loss_fn), params, v)``. Exact to
  rounding, no graph kept between calls; needs forward-mode AD through the model.
* ``fd``: central finite differences of two first-order gradients,
  Hv ~ (g(x + eps v) - g(x - eps v)) / (2 eps). Only first-order autograd (no ``create_graph``),
  so every pass may use fused attention and activation checkpointing. O(eps^2) truncation error.
  The two arithmetic steps run through the fused ops ``resalign_fast.ops.fd_hvp.fd_perturb`` /
  ``fd_combine`` (per parameter tensor, flattened).

The ``fd`` step (``fd_eps``): the error of a central difference is about
eps^2 ||D^3 L|| ||v||^3 / 6 (truncation) + u ||g|| / eps (rounding, u = unit roundoff of the
dtype), minimised at eps ~ u^(1/3). The perturbation is scaled to the parameters:
eps ||v|| = FD_SCALE * u^(1/3) * (1 + ||x||), so the relative change of x is ~u^(1/3)
regardless of how v is scaled (Richardson iterates shrink or grow) and of the parameter count.
FD_SCALE = 0.5 is the measured choice. Relative error against ``exact`` on the tiny test UNet
(fp32, loss = MSE of the output, 3 seeds each; FD_SCALE in 0.03, 0.1, 0.2, 0.3, 0.5, 1):

    attention q/k/out weights (1664 numbers, ||x|| = 7.4): 4e-3 1.3e-3 7e-4 5e-4 2.6e-4 1.3e-4
    conv_in + resnet conv1 + time_emb_proj (13984, 7.7): 1.3e-3 3.9e-4 2e-4 1.6e-4 1.8e-4 6.7e-4

Rounding dominates to the left of each minimum, truncation to the right; 0.5 stays within 2x of
the best of both rows (worst 2.6e-4). In fp64 the error is 1e-10 to 1e-9 over the same range.
fp16/bf16 points give u^(1/3) ~ 0.1 to 0.2 and a poor estimate: keep the master weights in fp32.

Loss terms. ``loss_fn`` may be a list of functions whose sum is the loss (DreamBooth: instance and
prior terms). Every backend then differentiates one term at a time and sums the products, so only
one term's forward graph is alive at once; ``exact`` rebuilds its double-backward graph per term
and call (with a single term it builds it once).

In place (``fd`` only, ``inplace=True``): ``params`` are the leaf tensors that the loss reads (a
module's parameters), perturbed in place: x += eps v, backward with post-accumulate-grad hooks
adding each gradient into one buffer d; x -= 2 eps v, backward subtracting; x += eps v. Live
full-size vectors: x and d (plus v, owned by the caller), against x, both perturbed copies and
both gradients for the copying ``fd``. x comes back to within rounding (about 1 ulp per call).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from resalign_fast.hypergrad.vec import norm
from resalign_fast.inner.inplace import backward_into
from resalign_fast.ops.fd_hvp import fd_combine, fd_perturb

LossFn = Callable[[list[Tensor]], Tensor]
HVP = Callable[[list[Tensor]], list[Tensor]]

BACKENDS = ("exact", "jvp", "fd")
FD_SCALE = 0.5  # measured, see the module docstring

__all__ = ["BACKENDS", "fd_eps", "make_hvp", "term_grads"]


def fd_eps(x: Sequence[Tensor], v: Sequence[Tensor], scale: float = FD_SCALE) -> float:
    """Finite-difference step: eps = scale * u^(1/3) * (1 + ||x||) / ||v||.

    Args:
        x: parameters (list of tensors); their dtype sets the unit roundoff u.
        v: direction (list of tensors), ||v|| > 0.
        scale: multiplier (measured default ``FD_SCALE``).

    Returns:
        eps as a Python float.
    """
    u = torch.finfo(x[0].dtype).eps
    return scale * u ** (1.0 / 3.0) * (1.0 + norm(x)) / norm(v)


def _leaves(params: Sequence[Tensor]) -> list[Tensor]:
    return [p.detach().clone().requires_grad_(True) for p in params]


def term_grads(loss_fns: Sequence[LossFn], x: Sequence[Tensor], split: bool = True) -> list[Tensor]:
    """First-order gradient of the sum of loss_fns at x (no create_graph); zeros where x is unused.

    Args:
        loss_fns: ``fn(params: list[Tensor]) -> Tensor`` (0-d) terms whose sum is the loss.
        x: the point (not modified: detached leaves sharing its storage are differentiated).
        split: one term at a time, accumulating tensor by tensor, so that only one term's forward
            graph is alive (DreamBooth); else the sum at once.
    """
    total: list[Tensor | None] = [None] * len(x)
    with torch.enable_grad():
        leaves = [p.detach().requires_grad_(True) for p in x]
        groups = [[fn] for fn in loss_fns] if split else [list(loss_fns)]
        for group in groups:
            loss = group[0](leaves)
            for fn in group[1:]:
                loss = loss + fn(leaves)
            _add_into(total, torch.autograd.grad(loss, leaves, allow_unused=True))
    return [torch.zeros_like(p) if t is None else t for p, t in zip(leaves, total)]


def _add_into(total: list[Tensor | None], terms: Sequence[Tensor | None]) -> list[Tensor | None]:
    """total[i] += terms[i] tensor by tensor (out of place: autograd may return expanded
    tensors), so at most one extra parameter-sized tensor is alive; None entries are zero."""
    for i, g in enumerate(terms):
        if g is not None:
            total[i] = g if total[i] is None else total[i] + g
    return total


def _check_v(v: Sequence[Tensor], params: list[Tensor]) -> list[Tensor]:
    v = list(v)
    if len(v) != len(params):
        raise ValueError(f"hvp got {len(v)} tensors, params has {len(params)}")
    for i, (vi, pi) in enumerate(zip(v, params)):
        if vi.shape != pi.shape:
            raise ValueError(
                f"hvp: v[{i}] has shape {tuple(vi.shape)}, params[{i}] has {tuple(pi.shape)}"
            )
    return [vi.detach().to(pi.dtype) for vi, pi in zip(v, params)]


def _make_exact(loss_fns: list[LossFn], params: list[Tensor]) -> HVP:
    leaves = _leaves(params)

    def graph(fn: LossFn):
        """(gradient with its graph, indices of entries that carry a graph)."""
        with torch.enable_grad():
            gs = torch.autograd.grad(fn(leaves), leaves, create_graph=True, allow_unused=True)
        # Gradient entries that carry no graph are constant in x: their rows of H are zero.
        return gs, [i for i, g in enumerate(gs) if g is not None and g.requires_grad]

    def product(gs, live, v: list[Tensor], keep: bool) -> list[Tensor]:
        if not live:
            return [torch.zeros_like(p) for p in leaves]
        hv = torch.autograd.grad(
            [gs[i] for i in live],
            leaves,
            [v[i] for i in live],
            retain_graph=keep,
            allow_unused=True,
        )
        return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(leaves, hv)]

    if len(loss_fns) == 1:
        kept = graph(loss_fns[0])  # built once, reused by every call
        return lambda v: product(*kept, _check_v(v, leaves), keep=True)

    def hvp(v: list[Tensor]) -> list[Tensor]:
        v, out = _check_v(v, leaves), [None] * len(leaves)
        for fn in loss_fns:  # one term's graph at a time
            _add_into(out, product(*graph(fn), v, keep=False))
        return out

    return hvp


def _make_jvp(loss_fns: list[LossFn], params: list[Tensor]) -> HVP:
    primals = [p.detach() for p in params]
    grad_fns = [torch.func.grad(fn) for fn in loss_fns]

    def hvp(v: list[Tensor]) -> list[Tensor]:
        v, out = _check_v(v, primals), [None] * len(primals)
        for grad_fn in grad_fns:
            try:
                _, hv = torch.func.jvp(grad_fn, (primals,), (v,))
            except RuntimeError as err:
                if "ZeroTensors are immutable" not in str(err):
                    raise
                raise RuntimeError(
                    "hvp backend 'jvp': forward-over-reverse failed inside torch (a known bug, "
                    "e.g. "
                    "F.mse_loss(..., reduction='mean'), pytorch/pytorch#123996); write the loss as "
                    "(a - b).square().mean() or use backend 'exact' or 'fd'"
                ) from err
            _add_into(out, [h.detach() for h in hv])
        return out

    return hvp


def _make_fd(loss_fns: list[LossFn], params: list[Tensor], eps: float | None) -> HVP:
    x = [p.detach().contiguous() for p in params]
    # Both evaluation points are written into buffers allocated once (fd_perturb's out=): they
    # are the gradient passes' inputs, dead once the call returns. The result is a fresh tensor,
    # so nothing returned is overwritten by a later call.
    plus = [torch.empty_like(xi) for xi in x]
    minus = [torch.empty_like(xi) for xi in x]

    def hvp(v: list[Tensor]) -> list[Tensor]:
        v = _check_v(v, x)
        if norm(v) == 0.0:
            return [torch.zeros_like(p) for p in x]
        e = fd_eps(x, v) if eps is None else float(eps)
        for xi, vi, xp, xm in zip(x, v, plus, minus):
            fd_perturb(xi.view(-1), vi.contiguous().view(-1), e, out=(xp.view(-1), xm.view(-1)))
        g_plus = term_grads(loss_fns, plus)
        g_minus = term_grads(loss_fns, minus)
        return [
            fd_combine(gp.contiguous().view(-1), gm.contiguous().view(-1), e).view(xi.shape)
            for xi, gp, gm in zip(x, g_plus, g_minus)
        ]

    return hvp


def _make_fd_inplace(loss_fns: list[LossFn], params: list[Tensor], eps: float | None) -> HVP:
    for i, p in enumerate(params):
        if not (p.is_leaf and p.requires_grad):
            raise ValueError(f"hvp inplace: params[{i}] must be a leaf tensor that requires grad")

    def hvp(v: list[Tensor]) -> list[Tensor]:
        v = _check_v(v, params)
        if norm(v) == 0.0:
            return [torch.zeros_like(p) for p in params]
        e = fd_eps(params, v) if eps is None else float(eps)
        d: list[Tensor | None] = [None] * len(params)

        def add(i: int, g: Tensor) -> None:
            d[i] = g if d[i] is None else d[i].add_(g)

        def sub(i: int, g: Tensor) -> None:
            d[i] = g.neg_() if d[i] is None else d[i].sub_(g)

        shift = 0.0  # params = x + shift * v
        try:
            for step, on_grad in ((e, add), (-2.0 * e, sub)):
                with torch.no_grad():
                    for p, vi in zip(params, v):
                        p.add_(vi, alpha=step)
                shift += step
                for fn in loss_fns:
                    with torch.enable_grad():
                        backward_into(params, fn(params), on_grad)
        finally:
            with torch.no_grad():
                for p, vi in zip(params, v):
                    p.add_(vi, alpha=-shift)
        with torch.no_grad():
            return [
                torch.zeros_like(p) if di is None else di.div_(2.0 * e) for p, di in zip(params, d)
            ]

    return hvp


def make_hvp(
    loss_fn: LossFn | Sequence[LossFn],
    params: Sequence[Tensor],
    *,
    backend: str = "exact",
    eps: float | None = None,
    inplace: bool = False,
) -> HVP:
    """Build v -> H v for the Hessian H of ``loss_fn`` at ``params``.

    Args:
        loss_fn: ``loss_fn(params: list[Tensor]) -> Tensor`` (0-d), or a list of such functions
            whose sum is the loss (differentiated one term at a time, see the module docstring).
            For ``jvp`` each must be a pure function of its argument (use
            ``torch.func.functional_call`` for modules).
        params: the point, a list of tensors of any shapes. Without ``inplace`` never modified
            (``exact`` copies them; ``jvp``/``fd`` keep detached views, so do not change them in
            place while the returned hvp is in use).
        backend: "exact", "jvp" or "fd" (see the module docstring).
        eps: fixed finite-difference step for ``fd``; None picks ``fd_eps(params, v)`` per call.
        inplace: ``fd`` only: params are leaf tensors that require grad (e.g. a module's
            parameters, read by loss_fn), perturbed in place during each call and put back to
            within rounding; their ``.grad`` must be None.

    Returns:
        ``hvp(v: list[Tensor]) -> list[Tensor]``, v and the result shaped like ``params``; the
        result carries no autograd graph and is a fresh tensor per call.

    Raises:
        ValueError: unknown backend, empty params or loss list, eps or inplace given for a backend
            other than fd, or inplace params that are not leaves requiring grad.
    """
    params = list(params)
    fns = [loss_fn] if callable(loss_fn) else list(loss_fn)
    if not params:
        raise ValueError("make_hvp: params is an empty list")
    if not fns:
        raise ValueError("make_hvp: loss_fn is an empty list of terms")
    if backend not in BACKENDS:
        raise ValueError(f"unknown hvp backend {backend!r}; choose one of {list(BACKENDS)}")
    if eps is not None and backend != "fd":
        raise ValueError(f"eps applies only to backend 'fd', not {backend!r}")
    if inplace and backend != "fd":
        raise ValueError(f"inplace applies only to backend 'fd', not {backend!r}")
    if eps is not None and not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if backend == "exact":
        return _make_exact(fns, params)
    if backend == "jvp":
        return _make_jvp(fns, params)
    return _make_fd_inplace(fns, params, eps) if inplace else _make_fd(fns, params, eps)
