"""Attention backends against attention_ref: outputs, gradients, HVPs (both modes) and memory."""

import importlib
import os

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from resalign_fast.memplan.tracker import StorageTracker
from resalign_fast.ops import registry
from resalign_fast.ops.attention import (
    attention,
    attention_ref,
    attention_triton,
    chunked_attention,
    not_supported_reasons,
    select_backend,
)

# Tiny ops on a shared 2-core machine run ~20x faster on 1 thread than on 2 (oversubscribed).
pytestmark = pytest.mark.usefixtures("one_thread")


def _qkv(shape_q, nk, dv=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    *lead, nq, d = shape_q
    q = torch.randn(*lead, nq, d, generator=g, dtype=dtype)
    k = torch.randn(*lead, nk, d, generator=g, dtype=dtype)
    v = torch.randn(*lead, nk, dv or d, generator=g, dtype=dtype)
    return q, k, v


def _mask(kind, q, k, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (q.shape[0], 1, q.shape[-2], k.shape[-2])  # broadcast over heads
    if kind == "none":
        return None
    if kind == "additive":
        return torch.randn(shape, generator=g, dtype=q.dtype)
    keep = torch.rand(shape, generator=g) > 0.3
    keep[..., 0] = True  # no fully masked row (NaN in every implementation)
    if kind == "bool_keys":
        return keep[..., :1, :]  # (B, 1, 1, Nk): key padding, broadcast over queries
    return keep


def _loss_and_grads(fn, q, k, v, w):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    return (out, *torch.autograd.grad((out * w).sum(), (q, k, v)))


def _assert_close(got, want, dtype):
    for g, w in zip(got, want, strict=True):
        if dtype == torch.float64:
            torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)
        else:
            torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mask", ["none", "additive", "bool", "bool_keys"])
@pytest.mark.parametrize(
    "shape_q,nk,dv,chunk",
    [
        ((2, 3, 37, 8), 29, None, 8),  # odd lengths, last chunk partial
        ((1, 2, 13, 5), 77, 3, 1),  # cross-attention, Dv != D, one row per chunk
        ((2, 1, 9, 4), 9, None, 64),  # one chunk larger than Nq
    ],
)
def test_chunked_attention_matches_ref(shape_q, nk, dv, chunk, mask, dtype):
    q, k, v = _qkv(shape_q, nk, dv, dtype)
    m = _mask(mask, q, k)
    w = torch.randn(*q.shape[:-1], v.shape[-1], dtype=dtype)
    got = _loss_and_grads(
        lambda q, k, v: chunked_attention(q, k, v, chunk=chunk, attn_mask=m), q, k, v, w
    )
    want = _loss_and_grads(lambda q, k, v: attention_ref(q, k, v, attn_mask=m), q, k, v, w)
    _assert_close(got, want, dtype)


def _hvp_reverse_reverse(fn, q, k, v, t, w):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    grads = torch.autograd.grad((fn(q, k, v).square() * w).sum(), (q, k, v), create_graph=True)
    return torch.autograd.grad(grads, (q, k, v), t)


def _hvp_func_jvp_of_grad(fn, q, k, v, t, w):
    grad = torch.func.grad(lambda *a: (fn(*a).square() * w).sum(), argnums=(0, 1, 2))
    return torch.func.jvp(grad, (q, k, v), t)[1]


def _hvp_forward_ad(fn, q, k, v, t, w):
    with fwAD.dual_level():
        duals = [fwAD.make_dual(x, tx).requires_grad_() for x, tx in zip((q, k, v), t)]
        grads = torch.autograd.grad((fn(*duals).square() * w).sum(), duals)
        return [fwAD.unpack_dual(g).tangent for g in grads]


@pytest.mark.parametrize("hvp", [_hvp_reverse_reverse, _hvp_func_jvp_of_grad, _hvp_forward_ad])
@pytest.mark.parametrize("mask", ["none", "additive"])
def test_chunked_hvp_matches_ref(hvp, mask):
    q, k, v = _qkv((2, 2, 23, 6), 17, 5, seed=3)
    m = _mask(mask, q, k)
    t = tuple(torch.randn_like(x) for x in (q, k, v))
    w = torch.randn(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    got = hvp(lambda q, k, v: chunked_attention(q, k, v, 0.3, chunk=6, attn_mask=m), q, k, v, t, w)
    want = hvp(lambda q, k, v: attention_ref(q, k, v, 0.3, attn_mask=m), q, k, v, t, w)
    _assert_close(got, want, torch.float64)


def test_chunked_gradcheck_and_gradgradcheck():
    """Finite differences of every first and second derivative, including w.r.t. the incoming
    grad."""
    q, k, v = (x.requires_grad_() for x in _qkv((1, 2, 7, 3), 5, 2, seed=4))
    fn = lambda q, k, v: chunked_attention(q, k, v, chunk=3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))
    assert torch.autograd.gradgradcheck(fn, (q, k, v))
    assert torch.autograd.gradcheck(fn, (q, k, v), check_forward_ad=True, check_backward_ad=False)


def _peak_bytes(fn, n, mode):
    q, k, v = _qkv((1, 2, n, 16), n, dtype=torch.float32, seed=n)
    t = tuple(torch.randn_like(x) for x in (q, k, v))
    w = torch.ones(1, 2, n, 16)
    with StorageTracker(block=1) as tracker:
        (_hvp_reverse_reverse if mode == "double_backward" else _hvp_func_jvp_of_grad)(
            fn, q, k, v, t, w
        )
    return tracker.peak


@pytest.mark.parametrize("mode", ["double_backward", "jvp_of_grad"])
def test_hvp_peak_memory_grows_linearly(mode):
    """Doubling N doubles the chunked HVP's peak and quadruples attention_ref's.

    Measured (fp32, B*H=2, D=16, chunk 64, MiB at N=256/512/1024): double backward, ref
    5.9/22.8/89.5, chunked 1.9/3.7/7.4; jvp of grad, ref 6.9/26.8/105.5, chunked 1.7/3.5/6.9.
    """
    chunked = lambda q, k, v: chunked_attention(q, k, v, chunk=64)  # noqa: E731
    ns = (256, 512, 1024)
    ref = [_peak_bytes(attention_ref, n, mode) for n in ns]
    lean = [_peak_bytes(chunked, n, mode) for n in ns]
    for i in (1, 2):
        assert 1.7 < lean[i] / lean[i - 1] < 2.3, lean
        assert ref[i] / ref[i - 1] > 3.5, ref
    assert lean[-1] * 10 < ref[-1]


def test_dispatch_selects_and_explains():
    q, k, v = _qkv((1, 2, 5, 4), 6, dtype=torch.float32)
    assert select_backend(q, k, v, order=1) == "sdpa"
    assert (
        select_backend(q, k, v, order=2) == "chunked"
    )  # CPU tensors: never the Triton interpreter
    assert not_supported_reasons("chunked", q, k, v, order=2) == []
    with pytest.raises(ValueError, match="sdpa.*double backward"):
        attention(q, k, v, backend="sdpa", order=2)
    with pytest.raises(ValueError, match="no backend 'flash3'"):
        attention(q, k, v, backend="flash3")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="triton"):
            attention(q, k, v, backend="triton")


@pytest.mark.parametrize("backend", ["auto", "sdpa", "chunked", "math"])
def test_dispatch_backends_match_ref(backend):
    q, k, v = _qkv((2, 2, 11, 4), 7, dtype=torch.float64, seed=5)
    m = _mask("additive", q, k)
    w = torch.randn(2, 2, 11, 4, dtype=torch.float64)
    got = _loss_and_grads(lambda q, k, v: attention(q, k, v, 0.7, backend, 1, m, 4), q, k, v, w)
    want = _loss_and_grads(lambda q, k, v: attention_ref(q, k, v, 0.7, m), q, k, v, w)
    _assert_close(got, want, torch.float64)


def test_chunked_rejects_bad_inputs():
    q, k, v = _qkv((1, 1, 4, 3), 5)
    with pytest.raises(ValueError, match="shapes disagree"):
        chunked_attention(q, k[..., :2], v)
    with pytest.raises(ValueError, match="chunk must be"):
        chunked_attention(q, k, v, chunk=0)
    with pytest.raises(ValueError, match="must not require grad"):
        chunked_attention(
            q, k, v, attn_mask=torch.zeros(1, 1, 4, 5, dtype=q.dtype, requires_grad=True)
        )


# ---- Triton kernels (TRITON_INTERPRET=1 on CPU: about 1.8 ms per program, keep sizes small) ----


def _triton_module():
    """The kernels, in Triton's interpreter on a machine without CUDA (decided at their import)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return registry.import_kernels("attention")
    os.environ["TRITON_INTERPRET"] = "1"
    kern = registry.import_kernels("attention")
    return kern if kern.INTERPRETED else importlib.reload(kern)  # imported earlier without it


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_DTYPES = [torch.float32] + ([torch.float16, torch.bfloat16] if DEVICE == "cuda" else [])


def _rel_err(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def _check_against_fp64(fast, plain, exact):
    """fp32: relative error <= 1e-3; fp16/bf16: <= 2x plain PyTorch's error in the same dtype."""
    for f, p, e in zip(fast, plain, exact, strict=True):
        bound = 1e-3 if f.dtype == torch.float32 else 2 * _rel_err(p, e) + 1e-3
        assert _rel_err(f, e) <= bound, (_rel_err(f, e), bound)


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize(
    "b,h,nq,nk,d",
    [
        (2, 2, 37, 77, 40),  # SD cross-attention: 77 text tokens
        (1, 1, 37, 37, 80),
        (1, 1, 20, 33, 160),
        (1, 1, 1000, 77, 40),
    ],
)
def test_triton_matches_ref(b, h, nq, nk, d, dtype):
    _triton_module()  # imported in the interpreter on CPU
    g = torch.Generator().manual_seed(nq + d)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(DEVICE) for n in (nq, nk, nk))
    w = torch.randn(b, h, nq, d, generator=g).to(DEVICE)
    runs = [
        _loss_and_grads(attention_triton, *(x.to(dtype) for x in (q, k, v)), w.to(dtype)),
        _loss_and_grads(attention_ref, *(x.to(dtype) for x in (q, k, v)), w.to(dtype)),
        _loss_and_grads(attention_ref, *(x.double() for x in (q, k, v)), w.double()),
    ]
    _check_against_fp64(*runs)


@pytest.mark.parametrize("hvp", [_hvp_reverse_reverse, _hvp_func_jvp_of_grad])
def test_triton_hvp_matches_ref(hvp):
    _triton_module()  # imported in the interpreter on CPU
    q, k, v = (x.float().to(DEVICE) for x in _qkv((1, 2, 21, 40), 77, seed=6))
    # processor layout: (B, N, H, D) projections viewed as (B, H, N, D), i.e. non-contiguous
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    t = tuple(torch.randn_like(x) for x in (q, k, v))
    w = torch.randn_like(q)
    got = hvp(lambda q, k, v: attention_triton(q, k, v, chunk=8), q, k, v, t, w)
    want = hvp(
        attention_ref, *(x.double() for x in (q, k, v)), tuple(x.double() for x in t), w.double()
    )
    _check_against_fp64(got, got, want)


def test_triton_dispatch_and_refusals():
    kern = _triton_module()
    q, k, v = (x.float().to(DEVICE) for x in _qkv((1, 1, 9, 16), 11, seed=7))
    torch.testing.assert_close(
        attention(q, k, v, backend="triton", order=2), attention_ref(q, k, v)
    )
    reasons = kern.not_supported_reasons(
        "triton", q.double(), k.double(), v[..., :8].double(), torch.zeros(9, 11)
    )
    assert len(reasons) == 3 and all(r.startswith("triton:") for r in reasons), reasons
    with pytest.raises(ValueError, match="mask"):
        attention(q, k, v, backend="triton", attn_mask=torch.zeros(9, 11, device=DEVICE))
