"""Attention variants at Stable Diffusion v1.4 shapes on a CUDA device: a markdown table.

    python benchmarks/gpu_attention.py [--dtype float32 bfloat16] [--chunks 256 4096] [--reps 3]
    TRITON_INTERPRET=1 python benchmarks/gpu_attention.py --device cpu --batch 1 --heads 2 --tokens
    64 \
        --text 7 --head-dim 16 --chunk 32 --chunks 16 --reps 1            (the CPU rehearsal)

Rows: math (attention_ref), chunked, sdpa (PyTorch's fused kernels), triton; workloads: forward+
backward, and one Hessian-vector product by double backward (hvp_rr) and by torch.func jvp of grad
(hvp_fwd). Shapes (defaults): B=2, 8 heads, D=40; self-attention N=4096 (64x64 latents) and
cross-attention with 77 text keys. Columns: median milliseconds over --reps runs after a warm-up,
and the memory allocated above the inputs in MiB (torch.cuda.max_memory_allocated; on --device
cpu the CPU allocator's events, see gpu_ops.cpu_peak_bytes). A cell that cannot run says n/a
with a footnote giving the reason. The defaults take well under a minute on an H200 (Triton
compilation included); the 2026-11-29 run with 5 reps and chunks 256 1024 4096 took about 70 s.
On CPU, Triton runs only under its interpreter (TRITON_INTERPRET=1 before triton is imported),
about 2 ms per program: keep the shapes tiny there.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_ops import cpu_peak_bytes  # noqa: E402

from resalign_fast.ops.attention import attention, attention_ref, not_supported_reasons  # noqa: E402

VARIANTS = ("math", "chunked", "sdpa", "triton")
WORKLOADS = {"fwd_bwd": 1, "hvp_rr": 2, "hvp_fwd": 2}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--device",
        default="cuda",
        choices=("cuda", "cpu"),
        help="cpu: the rehearsal of gpu_check.sh",
    )
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], help="input dtypes")
    p.add_argument("--batch", type=int, default=2, help="B")
    p.add_argument("--heads", type=int, default=8, help="attention heads")
    p.add_argument("--tokens", type=int, default=4096, help="image tokens N (64x64 latents: 4096)")
    p.add_argument("--text", type=int, default=77, help="text keys of cross-attention")
    p.add_argument("--head-dim", type=int, default=40, help="D")
    p.add_argument("--reps", type=int, default=3, help="timed runs per cell (median)")
    p.add_argument("--chunk", type=int, default=1024, help="query rows per chunk (chunked, triton)")
    p.add_argument(
        "--chunks",
        type=int,
        nargs="*",
        default=[256, 4096],
        help="also time chunked hvp_rr at these chunk sizes (self-attention, first dtype; "
        "--chunk is in the main table)",
    )
    return p.parse_args(argv)


def shapes(a: argparse.Namespace) -> dict[str, tuple[int, int, int, int, int]]:
    n, t = a.tokens, a.text
    return {
        f"self N={n}": (a.batch, a.heads, n, n, a.head_dim),
        f"cross {n}x{t}": (a.batch, a.heads, n, t, a.head_dim),
    }


def _loss(fn, q, k, v):
    return fn(q, k, v).float().square().sum()


def make_run(fn, workload: str, q, k, v, t):
    """Closure: one forward+backward or one HVP (w.r.t. q, k, v along tangents t)."""
    if workload == "hvp_fwd":
        grad = torch.func.grad(functools.partial(_loss, fn), argnums=(0, 1, 2))
        return lambda: torch.func.jvp(grad, (q, k, v), t)[1]

    def run():
        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
        loss = _loss(fn, qq, kk, vv)
        if workload == "fwd_bwd":
            return torch.autograd.grad(loss, (qq, kk, vv))
        grads = torch.autograd.grad(loss, (qq, kk, vv), create_graph=True)
        return torch.autograd.grad(grads, (qq, kk, vv), t)

    return run


def measure(run, reps: int, device: str = "cuda") -> tuple[float, float]:
    """(median ms, peak MiB above what was allocated before)."""
    if device == "cpu":  # the warm-up runs under the profiler, which reads the peak
        peak = cpu_peak_bytes(run) / 2**20
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return sorted(times)[reps // 2] * 1e3, peak
    run()  # warm-up: Triton compilation, cuBLAS handles
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return sorted(times)[reps // 2] * 1e3, peak


def main(argv=None) -> int:
    args = parse_args(argv)
    dev = args.device
    if args.reps < 1:
        raise SystemExit("--reps must be >= 1")
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "gpu_attention.py needs a CUDA device (--device cpu for the CPU rehearsal)"
        )
    where = (
        torch.cuda.get_device_name()
        if dev == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    mib = ".0f" if dev == "cuda" else ".3f"
    print(f"{where}, torch {torch.__version__}, chunk {args.chunk}, {args.reps} reps\n")
    print(
        "| shape | dtype | variant | " + " | ".join(f"{w} ms | {w} MiB" for w in WORKLOADS) + " |"
    )
    print("|---|---|---|" + "---:|---:|" * len(WORKLOADS), flush=True)
    g = torch.Generator(device=dev).manual_seed(0)
    notes: list[str] = []
    for shape_name, (b, h, nq, nk, d) in shapes(args).items():
        for dtype in (getattr(torch, name) for name in args.dtype):
            q, k, v = (
                torch.randn(b, h, n, d, device=dev, generator=g, dtype=dtype) for n in (nq, nk, nk)
            )
            t = tuple(torch.randn_like(x) for x in (q, k, v))
            for variant in VARIANTS:
                cells = []
                for workload, order in WORKLOADS.items():
                    reasons = (
                        []
                        if variant == "math"
                        else not_supported_reasons(variant, q, k, v, order=order)
                    )
                    if reasons:
                        note = "; ".join(reasons)
                        if note not in notes:
                            notes.append(note)
                        cells.append(f"n/a [{notes.index(note) + 1}] | n/a")
                        continue
                    fn = (
                        attention_ref
                        if variant == "math"
                        else functools.partial(
                            attention, backend=variant, order=order, chunk=args.chunk
                        )
                    )
                    ms, peak = measure(make_run(fn, workload, q, k, v, t), args.reps, dev)
                    cells.append(f"{ms:.2f} | {peak:{mib}}")
                row = f"| {shape_name} | {str(dtype)[6:]} | {variant} | " + " | ".join(cells) + " |"
                print(row, flush=True)
            del q, k, v, t
            if dev == "cuda":
                torch.cuda.empty_cache()
    print("\n".join(f"[{i + 1}] {n}" for i, n in enumerate(notes)))
    if args.chunks:
        b, h, nq, nk, d = next(iter(shapes(args).values()))
        dtype = getattr(torch, args.dtype[0])
        q, k, v = (
            torch.randn(b, h, n, d, device=dev, generator=g, dtype=dtype) for n in (nq, nk, nk)
        )
        t = tuple(torch.randn_like(x) for x in (q, k, v))
        print(
            f"\nchunked hvp_rr, self N={nq}, {str(dtype)[6:]}\n\n| chunk | ms | MiB "
            f"|\n|---:|---:|---:|"
        )
        for chunk in args.chunks:
            fn = functools.partial(attention, backend="chunked", order=2, chunk=chunk)
            ms, peak = measure(make_run(fn, "hvp_rr", q, k, v, t), args.reps, dev)
            print(f"| {chunk} | {ms:.2f} | {peak:{mib}} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
