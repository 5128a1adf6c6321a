"""Shared pieces of the fused-op benchmarks (bench_richardson_step, bench_fd_hvp, bench_optim_step).

    python -m pytest benchmarks/ --benchmark-only

Each case times one backend of an op on a flat buffer of RESALIGN_BENCH_N elements (default
10,000,003 fp32) and, in the same run and with the same timer (best of `rounds`), the plain-torch
reference on the same device. benchmark.extra_info gets elements/s, GB/s (the bytes the fused op
must move at least), the peak bytes allocated beyond the inputs, the reference's time and peak, and
speedup_vs_ref; the same line is printed (pytest -s shows it). Peak bytes: torch.cuda's allocator
statistics on CUDA, resalign_fast.memplan's live-storage tracker on CPU. CPU timings are smoke
tests on a shared machine (threads: RESALIGN_BENCH_THREADS, default 1); GPU numbers come from
benchmarks/gpu_ops.py.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest
import torch

from resalign_fast.memplan.tracker import StorageTracker
from resalign_fast.ops import registry

N = int(os.environ.get("RESALIGN_BENCH_N", "10000003"))
THREADS = int(os.environ.get("RESALIGN_BENCH_THREADS", "1"))
FUSED_BACKENDS = ["torch", "cpp", "cuda", "triton"]


@pytest.fixture(scope="session", autouse=True)
def _bench_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def bench_device(op: str, backend: str) -> torch.device:
    """Device of a backend's case (the reference runs on the GPU when there is one), or skip."""
    cuda = torch.cuda.is_available()
    if backend == "triton" and not cuda:
        pytest.skip("Triton is benchmarked on GPUs only (the CPU interpreter's times mean nothing)")
    device = torch.device("cuda" if cuda and backend != "cpp" else "cpu")
    probe = torch.empty(1, device=device)
    reasons = registry.not_supported_reasons(op, backend, probe)
    if reasons:
        pytest.skip("; ".join(reasons))
    return device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn: Callable[[], object], device: torch.device, rounds: int) -> float:
    """Best wall time of `rounds` calls after one warm-up call."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by one call beyond what was live before it."""
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    with StorageTracker(block=1) as tracker:
        fn()
    return tracker.report().peak


@pytest.fixture
def measure(benchmark):
    """measure(fused, ref, device, n, bytes_moved, rounds=5): benchmark `fused`, time `ref` too."""

    def run(
        fused: Callable[[], object],
        ref: Callable[[], object],
        device: torch.device,
        n: int,
        bytes_moved: int,
        rounds: int = 5,
    ) -> dict:
        ref_s = best_seconds(ref, device, rounds)
        ref_peak = peak_extra_bytes(ref, device)
        peak = peak_extra_bytes(fused, device)

        def call():
            fused()
            _sync(device)

        benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
        seconds = benchmark.stats.stats.min
        info = {
            "device": str(device),
            "threads": torch.get_num_threads(),
            "n": n,
            "elements_per_s": n / seconds,
            "gb_per_s": bytes_moved / seconds / 1e9,
            "peak_extra_bytes": peak,
            "ref_seconds": ref_s,
            "ref_peak_extra_bytes": ref_peak,
            "speedup_vs_ref": ref_s / seconds,
        }
        benchmark.extra_info.update(info)
        print(
            f"\n{benchmark.name}: {seconds * 1e3:.2f} ms, {info['gb_per_s']:.1f} GB/s, "
            f"peak +{peak / 2**20:.0f} MiB | ref {ref_s * 1e3:.2f} ms, peak "
            f"+{ref_peak / 2**20:.0f} MiB | "
            f"speedup {info['speedup_vs_ref']:.2f}x"
        )
        return info

    return run
