"""Attention variants at Stable Diffusion v1.4 shapes on a CUDA device: a markdown table.

    python benchmarks/gpu_attention.py [--dtype float32 bfloat16] [--chunks 256 1024 4096]

Rows: math (attention_ref), chunked, sdpa (PyTorch's fused kernels), triton; workloads: forward+
backward, and one Hessian-vector product by double backward (hvp_rr) and by torch.func jvp of grad
(hvp_fwd). Shapes: B=2, 8 heads, D=40; self-attention N=4096 (64x64 latents) and cross-attention
with 77 text keys. Columns: median milliseconds over REPS runs after a warm-up, and
torch.cuda.max_memory_allocated above the inputs, in MiB. About 70 s on an H200 (Triton
compilation included) with --chunks 256 4096.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

from resalign_fast.ops.attention import attention, attention_ref, not_supported_reasons

REPS = 5
SHAPES = {"self N=4096": (2, 8, 4096, 4096, 40), "cross 4096x77": (2, 8, 4096, 77, 40)}
VARIANTS = ("math", "chunked", "sdpa", "triton")
WORKLOADS = {"fwd_bwd": 1, "hvp_rr": 2, "hvp_fwd": 2}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], help="input dtypes")
    p.add_argument("--chunk", type=int, default=1024, help="query rows per chunk (chunked, triton)")
    p.add_argument("--chunks", type=int, nargs="*", default=[256, 1024, 4096],
                   help="also time chunked hvp_rr at these chunk sizes (self-attention, first dtype)")
    return p.parse_args(argv)


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


def measure(run) -> tuple[float, float]:
    """(median ms, peak MiB above what was allocated before)."""
    run()  # warm-up: Triton compilation, cuBLAS handles
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(REPS):
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return sorted(times)[REPS // 2] * 1e3, peak


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_attention.py needs a CUDA device")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, chunk {args.chunk}\n")
    print("| shape | dtype | variant | " + " | ".join(f"{w} ms | {w} MiB" for w in WORKLOADS) + " |")
    print("|---|---|---|" + "---:|---:|" * len(WORKLOADS))
    g = torch.Generator(device="cuda").manual_seed(0)
    for shape_name, (b, h, nq, nk, d) in SHAPES.items():
        for dtype in (getattr(torch, name) for name in args.dtype):
            q, k, v = (torch.randn(b, h, n, d, device="cuda", generator=g, dtype=dtype) for n in (nq, nk, nk))
            t = tuple(torch.randn_like(x) for x in (q, k, v))
            for variant in VARIANTS:
                cells = []
                for workload, order in WORKLOADS.items():
                    reasons = [] if variant == "math" else not_supported_reasons(
                        variant, q, k, v, order=order)
                    if reasons:
                        cells.append("n/a | n/a")
                        continue
                    fn = attention_ref if variant == "math" else functools.partial(
                        attention, backend=variant, order=order, chunk=args.chunk)
                    ms, mib = measure(make_run(fn, workload, q, k, v, t))
                    cells.append(f"{ms:.2f} | {mib:.0f}")
                row = f"| {shape_name} | {str(dtype)[6:]} | {variant} | " + " | ".join(cells) + " |"
                print(row, flush=True)
            del q, k, v, t
            torch.cuda.empty_cache()
    if args.chunks:
        b, h, nq, nk, d = SHAPES["self N=4096"]
        dtype = getattr(torch, args.dtype[0])
        q, k, v = (torch.randn(b, h, n, d, device="cuda", generator=g, dtype=dtype) for n in (nq, nk, nk))
        t = tuple(torch.randn_like(x) for x in (q, k, v))
        print(f"\nchunked hvp_rr, self N=4096, {str(dtype)[6:]}\n\n| chunk | ms | MiB |\n|---:|---:|---:|")
        for chunk in args.chunks:
            fn = functools.partial(attention, backend="chunked", order=2, chunk=chunk)
            ms, mib = measure(make_run(fn, "hvp_rr", q, k, v, t))
            print(f"| {chunk} | {ms:.2f} | {mib:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
