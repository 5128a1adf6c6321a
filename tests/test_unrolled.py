"""Unrolled hypergradient (resalign_fast.hypergrad.unrolled): checkpointed vs full unrolling,
closed forms on quadratics, finite differences, truncation, memory, and a tiny diffusers UNet."""

from __future__ import annotations

import pytest
import torch

from resalign_fast.hypergrad.unrolled import unrolled_hypergrad
from resalign_fast.inner.optim import OptimSpec, init_state, step_

F64 = torch.float64
SPECS = [
    OptimSpec("sgd", lr=0.1),
    OptimSpec("sgd", lr=0.05, momentum=0.9, weight_decay=1e-2),
    OptimSpec("adam", lr=1e-2),
    OptimSpec("adamw", lr=1e-2, weight_decay=0.1),
]


# ----------------------------------------------------------------------------- problems
def _mlp_problem(
    seed: int, steps: int, dtype=F64, batch: int = 8, width: int = 5, device: str = "cpu"
):
    """theta = [W1 (3, width), b1 (width,), W2 (width, 2)]; a fresh batch per fine-tuning step."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=dtype).to(device)  # noqa: E731
    theta = [rand(3, width), 0.1 * rand(width), rand(width, 2) / width**0.5]
    xs = [rand(batch, 3) for _ in range(steps + 1)]
    ys = [rand(batch, 2) for _ in range(steps + 1)]

    def mse(p, x, y):
        return (torch.tanh(x @ p[0] + p[1]) @ p[2] - y).pow(2).mean()

    def ft_loss(phi, t):
        return mse(phi, xs[t], ys[t])

    def outer_loss(th, phi):  # "harmful" loss after fine-tuning plus a direct term in theta
        return -mse(phi, xs[steps], ys[steps]) + 0.01 * th[0].pow(2).sum()

    return theta, outer_loss, ft_loss


def _simulate(spec, theta, ft_loss, steps):
    """phi_T by plain no-graph steps (independent of unrolled.py)."""
    phi, state = [x.clone() for x in theta], init_state(spec, theta)
    for t in range(steps):
        leaves = [p.detach().requires_grad_() for p in phi]
        with torch.enable_grad():
            grads = list(torch.autograd.grad(ft_loss(leaves, t), leaves))
        step_(spec, phi, grads, state)
    return phi


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float((x - y).pow(2).sum()) for x, y in zip(a, b)) ** 0.5
    return num / sum(float(y.pow(2).sum()) for y in b) ** 0.5


# ----------------------------------------------------------------------------- checkpointed == full
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}-m{s.momentum}-wd{s.weight_decay}")
def test_checkpointed_equals_full(spec):
    steps = 5
    theta, outer, ft = _mlp_problem(seed=SPECS.index(spec), steps=steps)
    full = unrolled_hypergrad(theta, outer, ft, spec, steps, checkpoint=False)
    ckpt = unrolled_hypergrad(theta, outer, ft, spec, steps, checkpoint=True)
    first_order = unrolled_hypergrad(theta, outer, ft, spec, steps, truncate=0)
    assert (
        _rel(first_order, full) > 1e-4
    )  # the trajectory matters, so the comparison means something
    for a, b in zip(ckpt, full):
        assert a.shape == b.shape and a.dtype == F64
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("spec", [SPECS[1], SPECS[2]], ids=["sgd-momentum", "adam"])
def test_full_matches_finite_differences(spec):
    """The reference mode against a central difference of the no-graph simulation."""
    steps = 4
    theta, outer, ft = _mlp_problem(seed=20 + SPECS.index(spec), steps=steps)
    grad = unrolled_hypergrad(theta, outer, ft, spec, steps, checkpoint=False)
    g = torch.Generator().manual_seed(99)
    direction = [torch.randn(x.shape, generator=g, dtype=F64) for x in theta]
    h = 1e-6

    def total(th):
        with torch.no_grad():
            return float(outer(th, _simulate(spec, th, ft, steps)))

    plus = total([x + h * d for x, d in zip(theta, direction)])
    minus = total([x - h * d for x, d in zip(theta, direction)])
    fd = (plus - minus) / (2 * h)
    analytic = sum(float((a * d).sum()) for a, d in zip(grad, direction))
    assert abs(fd - analytic) <= 1e-6 * (1 + abs(analytic)), (fd, analytic)


def test_theta_not_modified_and_no_grad_context():
    theta, outer, ft = _mlp_problem(seed=3, steps=3)
    before = [x.clone() for x in theta]
    with torch.no_grad():
        grad = unrolled_hypergrad(theta, outer, ft, SPECS[2], 3)
    assert all(torch.equal(a, b) for a, b in zip(theta, before))
    assert all(not x.requires_grad for x in grad)


# ----------------------------------------------------------------------------- quadratic closed
# form
def _quadratic(seed: int, steps: int, spec: OptimSpec):
    """theta = [u (2, 3), v (4,)] flattened to z (10,); ft_loss_t = z^T A_t z / 2 - b_t^T z;
    outer = c^T phi + z_theta^T D z_theta / 2. Returns the problem and the per-step SGD
    Jacobians."""
    g = torch.Generator().manual_seed(seed)
    d = 10
    theta = [torch.randn(2, 3, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64)]
    a_s, b_s = [], []
    for _ in range(steps):
        m = torch.randn(d, d, generator=g, dtype=F64)
        a_s.append(m @ m.T / d + 0.5 * torch.eye(d, dtype=F64))
        b_s.append(torch.randn(d, generator=g, dtype=F64))
    c = torch.randn(d, generator=g, dtype=F64)
    dvec = torch.rand(d, generator=g, dtype=F64)
    flat = lambda ps: torch.cat([p.reshape(-1) for p in ps])  # noqa: E731

    def ft_loss(phi, t):
        z = flat(phi)
        return 0.5 * z @ a_s[t] @ z - b_s[t] @ z

    def outer_loss(th, phi):
        z = flat(th)
        return c @ flat(phi) + 0.5 * (dvec * z * z).sum()

    eye = torch.eye(d, dtype=F64)
    jac = [eye - spec.lr * (a + spec.weight_decay * eye) for a in a_s]  # d phi_{t+1} / d phi_t
    return theta, outer_loss, ft_loss, jac, c, dvec * flat(theta), flat


@pytest.mark.parametrize("checkpoint", [True, False])
@pytest.mark.parametrize("wd", [0.0, 0.05])
@pytest.mark.parametrize("truncate", [None, 2, 0])
def test_quadratic_sgd_closed_form(checkpoint, wd, truncate):
    steps = 5
    spec = OptimSpec("sgd", lr=0.1, weight_decay=wd)
    theta, outer, ft, jac, c, direct, flat = _quadratic(seed=5, steps=steps, spec=spec)
    first = 0 if truncate is None else steps - truncate
    # d/dtheta = direct + (I - lr A_first)^T ... (I - lr A_{T-1})^T c
    adj = c.clone()
    for t in reversed(range(first, steps)):
        adj = jac[t].T @ adj
    want = direct + adj
    got = flat(
        unrolled_hypergrad(theta, outer, ft, spec, steps, truncate=truncate, checkpoint=checkpoint)
    )
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- truncation
@pytest.mark.parametrize("checkpoint", [True, False])
def test_truncation_as_documented(checkpoint):
    spec, steps = SPECS[2], 5
    theta, outer, ft = _mlp_problem(seed=8, steps=steps)
    full = unrolled_hypergrad(theta, outer, ft, spec, steps, checkpoint=checkpoint)
    for big in (steps, steps + 3):
        same = unrolled_hypergrad(
            theta, outer, ft, spec, steps, truncate=big, checkpoint=checkpoint
        )
        assert all(torch.equal(a, b) for a, b in zip(same, full))
    # truncate=0: d_theta outer + d_phi outer at (theta, phi_T), phi_T from an independent
    # simulation.
    th = [x.clone().requires_grad_() for x in theta]
    phi_t = [p.requires_grad_() for p in _simulate(spec, theta, ft, steps)]
    grads = torch.autograd.grad(outer(th, phi_t), th + phi_t, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, th + phi_t)]
    d_th, d_phi = grads[:3], grads[3:]
    zero = unrolled_hypergrad(theta, outer, ft, spec, steps, truncate=0, checkpoint=checkpoint)
    for a, b, c in zip(zero, d_th, d_phi):
        torch.testing.assert_close(a, b + c, rtol=1e-10, atol=1e-12)
    # 0 < truncate < steps: checkpointed and full treat phi_{T-T'} and s_{T-T'} alike.
    other = unrolled_hypergrad(theta, outer, ft, spec, steps, truncate=2, checkpoint=not checkpoint)
    mine = unrolled_hypergrad(theta, outer, ft, spec, steps, truncate=2, checkpoint=checkpoint)
    for a, b in zip(mine, other):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert _rel(mine, full) > 1e-6 and _rel(mine, zero) > 1e-6


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(steps=-1), "steps"),
        (dict(steps=2.0), "steps"),
        (dict(steps=2, truncate=-1), "truncate"),
    ],
)
def test_bad_arguments(kwargs, match):
    theta, outer, ft = _mlp_problem(seed=1, steps=2)
    with pytest.raises(ValueError, match=match):
        unrolled_hypergrad(theta, outer, ft, SPECS[0], **kwargs)


def test_bad_losses():
    theta, outer, ft = _mlp_problem(seed=1, steps=2)
    with pytest.raises(ValueError, match="scalar"):
        unrolled_hypergrad(theta, outer, lambda phi, t: phi[0] * 2, SPECS[0], 2)
    with pytest.raises(ValueError, match="does not depend"):
        unrolled_hypergrad(theta, outer, lambda phi, t: torch.zeros((), dtype=F64), SPECS[0], 2)
    with pytest.raises(ValueError, match="theta"):
        unrolled_hypergrad([], outer, ft, SPECS[0], 2)


# ----------------------------------------------------------------------------- tiny diffusers UNet
def _unet_problem(dtype=torch.float32, device="cpu", batch: int = 1, size: int = 8, steps: int = 3):
    """Full-parameter theta of a tiny UNet2DConditionModel; denoising losses on fixed random
    batches."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import AttnProcessor
    from torch.func import functional_call

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    unet.set_attn_processor(AttnProcessor())  # CPU SDPA has no double backward
    unet.to(device=device, dtype=dtype).requires_grad_(False)
    names = [n for n, _ in unet.named_parameters()]
    theta = [p.detach() for _, p in unet.named_parameters()]
    g = torch.Generator().manual_seed(1)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=dtype).to(device)  # noqa: E731
    data = [
        (
            rand(batch, 4, size, size),
            torch.randint(0, 1000, (batch,), generator=g).to(device),
            rand(batch, 5, 8),
            rand(batch, 4, size, size),
        )
        for _ in range(steps + 1)
    ]

    def mse(phi, d):
        x, ts, enc, noise = d
        out = functional_call(
            unet, dict(zip(names, phi)), (x, ts), {"encoder_hidden_states": enc}
        ).sample
        return (out - noise).pow(2).mean()

    return theta, (lambda th, phi: -mse(phi, data[steps])), (lambda phi, t: mse(phi, data[t]))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
@pytest.mark.parametrize("device", DEVICES)
def test_unet_checkpointed_equals_full_fp32(device):
    spec, steps = OptimSpec("sgd", lr=0.1, momentum=0.9), 3
    theta, outer, ft = _unet_problem(steps=steps, device=device)
    # Measured on the shared 2-core CI box: oneDNN's first double backward through these tiny
    # convolutions costs about 3 s of set-up (4.2 s vs 1.3 s CPU for the first HVP), and one thread
    # halves the wall time of this test (15 s vs 30 s) because the ops are far too small to split.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # TF32 off: fp32 means fp32 on the GPU too
        with (
            torch.backends.mkldnn.flags(enabled=False),
            torch.backends.cudnn.flags(allow_tf32=False),
        ):
            matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = False
            full = unrolled_hypergrad(theta, outer, ft, spec, steps, checkpoint=False)
            ckpt = unrolled_hypergrad(theta, outer, ft, spec, steps, checkpoint=True)
    finally:
        torch.set_num_threads(threads)
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    assert all(torch.isfinite(x).all() for x in full)
    assert _rel(ckpt, full) <= 1e-5, _rel(ckpt, full)


# ----------------------------------------------------------------------------- memory
class _SavedBytes:
    """Bytes of distinct storages held by autograd graphs (saved tensors), live and peak."""

    def __init__(self) -> None:
        self.live: dict[int, list[int]] = {}
        self.current = self.peak = 0

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda h: h.tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, tensor):
        return _Held(self, tensor)


class _Held:
    def __init__(self, meter: _SavedBytes, tensor: torch.Tensor) -> None:
        # Keep a detached alias: holding a saved *output* itself would tie it to its own grad_fn
        # through the node that holds this object, a C++ cycle that Python gc cannot free.
        self.meter, self.tensor = meter, tensor.detach()
        self.key = tensor.untyped_storage().data_ptr()
        entry = meter.live.setdefault(self.key, [0, tensor.untyped_storage().nbytes()])
        if entry[0] == 0:
            meter.current += entry[1]
            meter.peak = max(meter.peak, meter.current)
        entry[0] += 1

    def __del__(self) -> None:
        entry = self.meter.live[self.key]
        entry[0] -= 1
        if entry[0] == 0:
            self.meter.current -= entry[1]
            del self.meter.live[self.key]


def _saved_peak(problem, spec, steps, checkpoint):
    theta, outer, ft = problem(steps)
    with _SavedBytes() as meter:
        unrolled_hypergrad(theta, outer, ft, spec, steps, checkpoint=checkpoint)
    assert meter.current == 0  # every graph was freed
    return meter.peak


def test_activation_memory_independent_of_steps():
    """Saved-for-backward bytes: flat in T when checkpointed, linear in T for full unrolling."""
    spec = SPECS[2]

    def problem(steps):
        return _mlp_problem(seed=4, steps=steps, dtype=torch.float32, batch=64, width=32)

    ckpt = [_saved_peak(problem, spec, s, True) for s in (2, 4, 8)]
    full = [_saved_peak(problem, spec, s, False) for s in (2, 4, 8)]
    assert ckpt[0] == ckpt[1] == ckpt[2], ckpt
    per_step = (full[1] - full[0]) / 2
    assert per_step > 0 and abs((full[2] - full[1]) / 4 - per_step) <= 0.05 * per_step, full
    assert full[2] > 3 * ckpt[2], (full, ckpt)


def _cuda_peak(problem, spec, steps, checkpoint) -> int:
    """Peak CUDA bytes allocated by one unrolled_hypergrad call above what was live before it."""
    theta, outer, ft = problem(steps)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    unrolled_hypergrad(theta, outer, ft, spec, steps, checkpoint=checkpoint)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("model", ["mlp", "unet"])
def test_cuda_peak_memory_growth(model):
    """torch.cuda.max_memory_allocated: checkpointed grows only by the (phi_t, s_t) snapshots."""
    spec, steps_list = OptimSpec("sgd", lr=0.05, momentum=0.9), (2, 4, 8)
    if model == "mlp":

        def problem(s):
            return _mlp_problem(
                seed=2, steps=s, dtype=torch.float32, batch=4096, width=512, device="cuda"
            )
    else:

        def problem(s):
            return _unet_problem(steps=s, device="cuda", batch=8, size=16)

    theta = problem(1)[0]
    snapshot_bytes = 2 * sum(x.numel() * x.element_size() for x in theta)  # phi_t + momentum buffer
    ckpt = [_cuda_peak(problem, spec, s, True) for s in steps_list]
    full = [_cuda_peak(problem, spec, s, False) for s in steps_list]
    print(
        f"\n{model}: params {snapshot_bytes // 2} B; peak bytes for steps {steps_list}: "
        f"checkpointed {ckpt}, full {full}"
    )
    allowance = 1.5 * (steps_list[-1] - steps_list[0]) * snapshot_bytes + 2**21
    assert ckpt[-1] - ckpt[0] <= allowance, (ckpt, allowance)
    assert full[-1] - full[0] > 2 * (ckpt[-1] - ckpt[0]), (full, ckpt)
