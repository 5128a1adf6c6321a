"""Attention variants, forward+backward and HVP: time and peak memory, ratios vs attention_ref.

    python -m pytest benchmarks/bench_attention.py --benchmark-only

Each test stores in benchmark.extra_info its peak bytes, and the peak and the time divided by those
of attention_ref measured in the same run (same shapes, same timer). Peak bytes come from
torch.cuda.max_memory_allocated on CUDA and from resalign_fast.memplan's live-storage tracker on
CPU. CPU sizes are small: the CPU numbers are smoke tests; benchmarks/gpu_attention.py gives the
SD-sized GPU table.
"""

from __future__ import annotations

import functools
import time

import pytest
import torch

from resalign_fast.memplan.tracker import StorageTracker
from resalign_fast.ops.attention import attention, attention_ref, not_supported_reasons

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# (B, H, Nq, Nk, D): SD v1.4's largest self-attention on GPU, a small one on CPU
SHAPE = (2, 8, 4096, 4096, 40) if CUDA else (1, 2, 512, 512, 40)
CHUNK = 1024 if CUDA else 128
ORDER = {"fwd_bwd": 1, "hvp": 2}


def _inputs(seed: int = 0):
    b, h, nq, nk, d = SHAPE
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(DEVICE) for n in (nq, nk, nk))
    tangents = tuple(torch.randn_like(x) for x in (q, k, v))
    return q, k, v, tangents


def _workload(variant: str, workload: str):
    """A closure running one forward+backward, or one double-backward HVP, of `variant`."""
    q, k, v, t = _inputs()
    if variant == "math":
        fn = attention_ref
    else:
        fn = functools.partial(attention, backend=variant, order=ORDER[workload], chunk=CHUNK)

    def run():
        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
        loss = fn(qq, kk, vv).square().sum()
        if workload == "fwd_bwd":
            grads = torch.autograd.grad(loss, (qq, kk, vv))
        else:
            grads = torch.autograd.grad(loss, (qq, kk, vv), create_graph=True)
            grads = torch.autograd.grad(grads, (qq, kk, vv), t)
        _sync()
        return grads

    return run


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _peak_bytes(run) -> int:
    """Peak bytes allocated while `run` executes, above what was live before."""
    if CUDA:
        _sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        _sync()
        return torch.cuda.max_memory_allocated() - base
    with StorageTracker(block=1) as tracker:
        run()
    return tracker.peak


def _seconds(run, reps: int = 3) -> float:
    """Median wall time of `reps` runs after one warm-up."""
    run()
    times = []
    for _ in range(reps):
        _sync()
        start = time.perf_counter()
        run()
        _sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@functools.cache
def _reference(workload: str) -> tuple[float, int]:
    run = _workload("math", workload)
    return _seconds(run), _peak_bytes(run)


@pytest.mark.parametrize("workload", ["fwd_bwd", "hvp"])
@pytest.mark.parametrize("variant", ["math", "chunked", "sdpa", "triton"])
def test_attention(benchmark, variant: str, workload: str):
    q, k, v, _ = _inputs()
    if variant == "triton" and not CUDA:
        pytest.skip("triton: timed on CUDA only (the CPU interpreter is a correctness tool)")
    if variant != "math":
        reasons = not_supported_reasons(variant, q, k, v, order=ORDER[workload])
        if reasons:
            pytest.skip("; ".join(reasons))
    run = _workload(variant, workload)
    ref_seconds, ref_peak = _reference(workload)
    seconds, peak = _seconds(run), _peak_bytes(run)
    benchmark.extra_info.update(
        shape=SHAPE,
        device=DEVICE,
        chunk=CHUNK,
        peak_bytes=peak,
        ref_peak_bytes=ref_peak,
        peak_ratio_vs_ref=peak / ref_peak,
        time_ratio_vs_ref=seconds / ref_seconds,
    )
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
