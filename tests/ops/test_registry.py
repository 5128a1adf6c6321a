"""Dispatch: the auto order, refusals with every reason, and the environment table."""

import pytest
import torch

from resalign_fast.ops import backends, registry
from resalign_fast.ops.fd_hvp import fd_combine
from resalign_fast.ops.registry import UnsupportedBackendError, select_backend


@pytest.fixture
def fake_op():
    """An op whose backends refuse according to a table the test controls."""
    refusals: dict[str, list[str]] = {}
    name = "fake_op_for_test"
    registry.register_op(name, ("fast", "medium", "slow"), lambda b, *t: list(refusals.get(b, [])))
    yield name, refusals
    registry._OPS.pop(name)


def test_auto_takes_first_backend_without_reasons(fake_op):
    name, refusals = fake_op
    x = torch.zeros(3)
    assert select_backend(name, "auto", x) == "fast"
    refusals["fast"] = ["no fast here"]
    assert select_backend(name, "auto", x) == "medium"
    refusals["medium"] = ["too big", "wrong dtype"]
    assert select_backend(name, "auto", x) == "slow"
    refusals["slow"] = ["never"]
    with pytest.raises(UnsupportedBackendError) as err:
        select_backend(name, "auto", x)
    for reason in ("no fast here", "too big", "wrong dtype", "never"):
        assert reason in str(err.value)


def test_named_backend_that_cannot_run_lists_every_reason(fake_op):
    name, refusals = fake_op
    refusals["medium"] = ["reason one", "reason two"]
    assert select_backend(name, "slow") == "slow"
    with pytest.raises(UnsupportedBackendError, match="reason one; reason two"):
        select_backend(name, "medium", torch.zeros(2))
    with pytest.raises(UnsupportedBackendError, match="has no backend 'warp'"):
        select_backend(name, "warp")


def test_auto_skip_passes_over_a_runnable_backend(fake_op):
    name, _ = fake_op
    registry.register_op(
        name,
        ("fast", "slow"),
        lambda b, *t: [],
        auto_skip=lambda b, *t: "debug only" if b == "fast" else None,
    )
    assert select_backend(name, "auto") == "slow"
    assert select_backend(name, "fast") == "fast"  # by name it runs


def test_builtin_refusals_on_cpu_tensors():
    x = torch.randn(5)
    cuda = registry.not_supported_reasons("fd_combine", "cuda", x, x)
    assert any("needs cuda" in r for r in cuda), cuda
    assert registry.not_supported_reasons("fd_combine", "torch", x, x) == []
    half = registry.not_supported_reasons("fd_combine", "cpp", x.half(), x.half())
    assert any("float16, needs one of float32, float64" in r for r in half), half
    strided = torch.randn(10)[::2]
    assert any(
        "not contiguous" in r
        for r in registry.not_supported_reasons("fd_combine", "cpp", strided, strided)
    )
    grad = torch.randn(5, requires_grad=True)
    assert any(
        "requires grad" in r for r in registry.not_supported_reasons("fd_combine", "cpp", grad, x)
    )
    with torch.no_grad():
        assert not any(
            "requires grad" in r
            for r in registry.not_supported_reasons("fd_combine", "cpp", grad, x)
        )


def test_auto_order_on_cpu_tensors(monkeypatch):
    """cuda and (outside the interpreter) triton refuse CPU tensors; then cpp if built, else
    torch."""
    x = torch.randn(7)
    expected = "cpp" if registry.extension()[0] is not None else "torch"
    assert select_backend("fd_combine", "auto", x, x) == expected
    if registry.interpreter_active():  # the interpreter runs CPU tensors, but auto passes it over
        assert registry.not_supported_reasons("fd_combine", "triton", x, x) == []
    # Without the extension everything falls back to the reference, and cpp says why.
    monkeypatch.setattr(backends, "_EXT", None)
    monkeypatch.setattr(backends, "_EXT_ERROR", "resalign_fast._C is not built (test)")
    assert select_backend("fd_combine", "auto", x, x) == "torch"
    with pytest.raises(UnsupportedBackendError, match=r"not built \(test\)"):
        fd_combine(x, x, 1e-3, backend="cpp")
    x64 = x.double()
    torch.testing.assert_close(
        fd_combine(x64, x64 + 2e-3, 1e-3), torch.full((7,), -1.0, dtype=torch.float64)
    )


def test_triton_refusal_without_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(3)
    reasons = registry.not_supported_reasons("richardson_step", "triton", x, x, x)
    assert any("TRITON_INTERPRET=1" in r for r in reasons), reasons
    with pytest.raises(UnsupportedBackendError, match="TRITON_INTERPRET=1"):
        registry.select_backend("richardson_step", "triton", x, x, x)


def test_availability_table_covers_every_builtin_op():
    for op in ("richardson_step", "fd_perturb", "fd_combine", "sgd_step", "adam_step"):
        table = registry.availability(op)
        assert list(table) == list(registry.STANDARD_BACKENDS)
        assert table["torch"] == []
        assert (table["cpp"] == []) == (registry.extension()[0] is not None)
        assert (table["cuda"] == []) == (
            torch.cuda.is_available() and not registry.extension_reasons(f"{op}_cuda")
        )


def test_cpp_results_do_not_depend_on_thread_count():
    """Fixed chunks and a fixed summation order: 1 and 2 threads give identical bits."""
    from resalign_fast.ops import adam_step, fd_perturb, richardson_step

    if registry.extension()[0] is None:
        pytest.skip(f"C++ kernels unavailable: {registry.extension()[1]}")
    n = 3 * 32768 + 5
    v, b, hv = (torch.randn(n, dtype=torch.float64) for _ in range(3))
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            p, m, s = (
                v.clone(),
                torch.zeros(n, dtype=torch.float64),
                torch.zeros(n, dtype=torch.float64),
            )
            adam_step(
                p,
                b,
                m,
                s,
                step=1,
                lr=1e-3,
                beta1=0.9,
                beta2=0.999,
                eps=1e-8,
                weight_decay=0.0,
                decoupled=False,
                backend="cpp",
            )
            results.append(
                (
                    *richardson_step(v, b, hv, 0.5, 1.0, backend="cpp"),
                    *fd_perturb(v, b, 1e-3, backend="cpp"),
                    p,
                )
            )
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)
