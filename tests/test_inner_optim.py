"""Functional optimizers (resalign_fast.inner.optim) against torch.optim trajectories."""

from __future__ import annotations

import pytest
import torch

from resalign_fast.inner.optim import OptimSpec, OptState, init_state, step, step_, step_ref_

SPECS = [
    OptimSpec("sgd", lr=0.05),
    OptimSpec("sgd", lr=0.05, weight_decay=0.1),
    OptimSpec("sgd", lr=0.02, momentum=0.9),
    OptimSpec("sgd", lr=0.02, momentum=0.9, weight_decay=1e-2),
    OptimSpec("adam", lr=1e-2),
    OptimSpec("adam", lr=1e-2, weight_decay=0.1),
    OptimSpec("adamw", lr=1e-2),
    OptimSpec("adamw", lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
]
STEPS = 20
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64]


def _fused_backends(device: str) -> list[str]:
    """Backends of resalign_fast.ops.optim_step that can run here ("auto" first), [] without it."""
    try:
        from resalign_fast.ops import (
            optim_step,  # noqa: F401  (registers the ops)
            registry,
        )
    except ModuleNotFoundError:
        return []
    t = torch.zeros(7, device=device)
    return ["auto"] + [
        b
        for b in ("cuda", "triton", "cpp")
        if not registry.not_supported_reasons("adam_step", b, t, t, t, t)
        and not registry.not_supported_reasons("sgd_step", b, t, t, t)
    ]


FUSED = [(d, b) for d in DEVICES for b in _fused_backends(d)]


def _torch_optim(spec: OptimSpec, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if spec.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=spec.lr,
            momentum=spec.momentum,
            weight_decay=spec.weight_decay,
            foreach=False,
        )
    cls = torch.optim.Adam if spec.name == "adam" else torch.optim.AdamW
    return cls(
        params,
        lr=spec.lr,
        betas=spec.betas,
        eps=spec.eps,
        weight_decay=spec.weight_decay,
        foreach=False,
    )


def _problem(dtype: torch.dtype, seed: int, device: str = "cpu"):
    """A small random nonlinear regression: params [W (5, 3), b (3,)], loss(params) -> scalar.
    Drawn in fp64 and then cast, so that one seed gives the same problem in every dtype."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype)  # noqa: E731
    x, y = draw(16, 5), draw(16, 3)
    params = [draw(5, 3), draw(3)]

    def loss(ps):
        return (torch.tanh(x @ ps[0] + ps[1]) - y).pow(2).mean()

    return params, loss


def _grads(loss, ps):
    ps = [p.detach().requires_grad_() for p in ps]
    return list(torch.autograd.grad(loss(ps), ps))


def _trajectory(kind: str, spec, params, loss, backend: str = "auto"):
    """Parameters after each of STEPS steps by "torch" (torch.optim), "pure" (step), "ref_"
    (step_ref_) or "step_" (step_ with `backend`)."""
    out = []
    if kind == "torch":
        ps = [p.clone().requires_grad_() for p in params]
        opt = _torch_optim(spec, ps)
        for _ in range(STEPS):
            opt.zero_grad()
            loss(ps).backward()
            opt.step()
            out.append([p.detach().clone() for p in ps])
        return out
    ps = [p.clone().requires_grad_() for p in params]  # in-place updates must accept such leaves
    state = init_state(spec, ps)
    for _ in range(STEPS):
        if kind == "pure":
            ps, state = step(spec, ps, _grads(loss, ps), state)
        elif kind == "ref_":
            step_ref_(spec, ps, _grads(loss, ps), state)
        else:
            step_(spec, ps, _grads(loss, ps), state, backend=backend)
        out.append([p.detach().clone() for p in ps])
    return out


def _assert_close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    if dtype == torch.float32:  # about 1 ulp of fp32 (2 allowed)
        bound = 2 * torch.finfo(dtype).eps * b.abs() + 1e-30
    else:
        bound = 1e-12 * (1 + b.abs())
    err = (a - b).abs()
    assert bool((err <= bound).all()), f"max err {err.max().item():.3g}"


def _seed(spec, dtype) -> int:
    return 2 * SPECS.index(spec) + (dtype == torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_trajectories_match_torch_optim(spec, dtype, device):
    """step, step_ref_ and step_(backend="torch") follow torch.optim to about 1 ulp."""
    params, loss = _problem(dtype, _seed(spec, dtype), device)
    ref = _trajectory("torch", spec, params, loss)
    assert not torch.equal(ref[-1][0], params[0])  # the optimizer actually moved
    runs = [_trajectory("pure", spec, params, loss), _trajectory("ref_", spec, params, loss)]
    runs.append(_trajectory("step_", spec, params, loss, backend="torch"))
    for traj in runs:
        for got_t, ref_t in zip(traj, ref):
            for got, want in zip(got_t, ref_t):
                _assert_close(got, want, dtype)


def _max_err(traj, ref) -> float:
    return max(
        float((a.double() - b.double()).abs().max())
        for ta, tb in zip(traj, ref)
        for a, b in zip(ta, tb)
    )


@pytest.mark.skipif(not FUSED, reason="resalign_fast.ops.optim_step is absent")
@pytest.mark.parametrize("device, backend", FUSED or [("cpu", "auto")])
@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_fused_step_trajectories(spec, device, backend):
    """step_ through the fused kernels: fp64 within 1e-12 of torch.optim; fp32 error against the
    fp64 trajectory at most 2x torch.optim's own fp32 error (the project's fast-path rule)."""
    params64, loss64 = _problem(torch.float64, _seed(spec, torch.float64), device)
    ref64 = _trajectory("torch", spec, params64, loss64)
    for got_t, ref_t in zip(_trajectory("step_", spec, params64, loss64, backend), ref64):
        for got, want in zip(got_t, ref_t):
            _assert_close(got, want, torch.float64)
    params32, loss32 = _problem(torch.float32, _seed(spec, torch.float64), device)
    err_torch = _max_err(_trajectory("torch", spec, params32, loss32), ref64)
    err_fused = _max_err(_trajectory("step_", spec, params32, loss32, backend), ref64)
    assert 0 < err_fused <= 2 * err_torch, (err_fused, err_torch)


def _flat_inputs(spec, seed):
    """Params, grads and a state after two steps (so every buffer is in use), fp64."""
    params, loss = _problem(torch.float64, seed)
    state = init_state(spec, params)
    for _ in range(2):
        params, state = step(spec, params, _grads(loss, params), state)
    return [p.detach() for p in params], _grads(loss, params), state


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_step_is_differentiable(spec):
    """gradcheck (fp64) of one step w.r.t. params, grads and every state tensor, at step 3."""
    g = torch.Generator().manual_seed(5)
    shapes = [(4, 3), (3,)]
    params = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    grads = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    state = init_state(spec, params)
    # exp_avg_sq is kept away from 0 so that finite differences stay on one side of sqrt's kink.
    state = OptState(
        3,
        {
            k: [
                torch.randn(s, generator=g, dtype=torch.float64).abs() + 0.5
                if k == "exp_avg_sq"
                else torch.randn(s, generator=g, dtype=torch.float64)
                for s in shapes
            ]
            for k in state.buffers
        },
    )
    n, m = len(params), len(grads)
    inputs = [t.clone().requires_grad_() for t in params + grads + state.tensors()]

    def f(*xs):
        new_p, new_s = step(
            spec, list(xs[:n]), list(xs[n : n + m]), state.with_tensors(list(xs[n + m :]))
        )
        return tuple(new_p) + tuple(new_s.tensors())

    assert torch.autograd.gradcheck(f, tuple(inputs), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_adam_step_differentiable_at_zero_gradient():
    """Zero gradients so far (exp_avg_sq == 0) must give finite derivatives, not NaN."""
    spec = OptimSpec("adam", lr=1e-2)
    p = torch.randn(4, dtype=torch.float64, requires_grad=True)
    g = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    new_p, _ = step(spec, [p], [g], init_state(spec, [p]))
    dp, dg = torch.autograd.grad(new_p[0].sum(), [p, g])
    assert torch.isfinite(dp).all() and torch.isfinite(dg).all()
    # d p1 / d g at g = 0: -lr * (1 - b1) / (1 - b1) / eps, from p1 = p - lr * g / (|g| + eps).
    torch.testing.assert_close(dg, torch.full_like(dg, -spec.lr / spec.eps), rtol=1e-12, atol=0)


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_step_does_not_modify_inputs(spec):
    params, grads, state = _flat_inputs(spec, seed=3)
    before = [t.clone() for t in params + grads + state.tensors()]
    step(spec, params, grads, state)
    assert state.step == 2
    for a, b in zip(before, params + grads + state.tensors()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_second_simulation_starts_fresh(spec):
    """Two simulations from the same start give the same (torch.optim) trajectory."""
    params, loss = _problem(torch.float64, seed=11)
    first = _trajectory("step_", spec, params, loss)
    second = _trajectory("step_", spec, params, loss)
    ref = _trajectory("torch", spec, params, loss)
    for a, b, c in zip(first[-1], second[-1], ref[-1]):
        assert torch.equal(a, b)
        _assert_close(a, c, torch.float64)
    s1, s2 = init_state(spec, params), init_state(spec, params)
    assert s1.step == 0 and all(float(t.abs().max()) == 0 for t in s1.tensors())
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(s1.tensors(), s2.tensors()))


def test_defaults_follow_torch_optim():
    assert OptimSpec("adam", lr=1e-3).weight_decay == 0.0
    assert OptimSpec("adamw", lr=1e-3).weight_decay == 1e-2
    assert OptimSpec("sgd", lr=1e-3).weight_decay == 0.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="rmsprop", lr=1e-3), "name"),
        (dict(name="sgd", lr=-1.0), "lr"),
        (dict(name="sgd", lr=float("nan")), "lr"),
        (dict(name="sgd", lr=1e-3, momentum=1.0), "momentum"),
        (dict(name="adam", lr=1e-3, momentum=0.9), "momentum"),
        (dict(name="adam", lr=1e-3, betas=(0.9, 1.0)), "betas"),
        (dict(name="adam", lr=1e-3, eps=-1.0), "eps"),
        (dict(name="adamw", lr=1e-3, weight_decay=-0.1), "weight_decay"),
    ],
)
def test_spec_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OptimSpec(**kwargs)


def test_mismatched_inputs_raise():
    spec = OptimSpec("adam", lr=1e-3)
    p = [torch.zeros(3)]
    with pytest.raises(ValueError, match="grads"):
        step(spec, p, [], init_state(spec, p))
    with pytest.raises(ValueError, match="do not fit"):
        step_(spec, p, [torch.zeros(3)], init_state(OptimSpec("sgd", lr=1e-3), p))
    with pytest.raises(ValueError, match="expected 2"):
        init_state(spec, p).with_tensors([torch.zeros(3)])
    assert isinstance(init_state(spec, p).clone(), OptState)
