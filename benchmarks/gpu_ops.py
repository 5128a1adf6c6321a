"""Fused ops per backend on a CUDA device, against their plain-torch references: a markdown table.

    python benchmarks/gpu_ops.py [--n 33554467] [--dtypes float32 bfloat16] [--reps 10]
    TRITON_INTERPRET=1 python benchmarks/gpu_ops.py --device cpu --n 4097 --reps 3   (CPU rehearsal)

Needs resalign_fast._C built with CUDA (`pip install --no-build-isolation .` on the GPU machine, or
`python setup.py build_ext --inplace`); without it the script JIT-builds the same sources with
torch.utils.cpp_extension.load (about 2 minutes on 16 cores) unless --no-jit. Columns: median
milliseconds over --reps runs after a warm-up (CUDA events), GB/s of the bytes the fused op must
move, torch.cuda.max_memory_allocated above the inputs, speedup against the reference timed the same
way, and the error rule of the tests: max |out - fp64 truth| divided by the reference's (<= 2
passes; "exact" when both are 0). A second table compares sgd_step/adam_step with torch.optim
(foreach=False).

--device cpu (the CPU rehearsal of gpu_check.sh) times with time.perf_counter, reads the peak from
the CPU allocator's events (torch.profiler, profile_memory), adds the "cpp" backend, and lists the
CUDA backend with the reason it cannot run. Triton runs on CPU tensors only under the interpreter
(TRITON_INTERPRET=1 before triton is imported), slowly: use a small --n; without it its rows say
why.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from resalign_fast.ops import backends, registry  # noqa: E402
from resalign_fast.ops.fd_hvp import fd_combine, fd_combine_ref, fd_perturb, fd_perturb_ref  # noqa: E402
from resalign_fast.ops.optim_step import adam_step, adam_step_ref, sgd_step, sgd_step_ref  # noqa: E402
from resalign_fast.ops.richardson_step import richardson_step, richardson_step_ref  # noqa: E402

BACKENDS = {"cuda": ("torch", "cuda", "triton"), "cpu": ("torch", "cpp", "triton", "cuda")}
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
SGD = dict(lr=1e-3, momentum=0.9, weight_decay=1e-2, first_step=False)
ADAM = dict(step=10, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, decoupled=True)


def jit_build_extension() -> float:
    """Builds csrc/ with CUDA through cpp_extension.load and installs it as resalign_fast._C."""
    from torch.utils.cpp_extension import load

    spec = importlib.util.spec_from_file_location("resalign_setup", ROOT / "setup.py")
    setup = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = setup
    spec.loader.exec_module(setup)
    build = Path(tempfile.mkdtemp(prefix="resalign_jit_"))
    setup.write_build_info(
        build / "generated" / "resalign_build_info.h", "cuda", "torch.utils.cpp_extension.load"
    )
    start = time.perf_counter()
    module = load(
        name="_C",
        sources=[str(ROOT / "csrc" / s) for s in setup.CPU_SOURCES + setup.CUDA_SOURCES],
        extra_cflags=setup.CXX_FLAGS + ["-DRESALIGN_WITH_CUDA"],
        extra_cuda_cflags=setup.NVCC_FLAGS + ["-DRESALIGN_WITH_CUDA"],
        extra_ldflags=setup.LINK_FLAGS,
        extra_include_paths=[str(ROOT / "csrc"), str(build / "generated")],
        build_directory=str(build),
        verbose=False,
    )
    sys.modules["resalign_fast._C"] = module
    backends._EXT, backends._EXT_ERROR = module, None
    return time.perf_counter() - start


def time_ms(fn, reps: int, device: str = "cuda") -> float:
    """Median milliseconds of fn() over reps runs after one warm-up (CUDA events; perf_counter on
    CPU)."""
    fn()
    if device == "cpu":
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@contextlib.contextmanager
def _stderr_to_devnull():
    """File descriptor 2 to /dev/null while the block runs: kineto writes a line to stderr at every
    profiler start and stop, and no setting turns that off."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def cpu_peak_bytes(fn) -> int:
    """Peak bytes the CPU allocator held above what was allocated before fn() (fn's temporaries and
    outputs), from torch.profiler's allocation events (C++ extensions' allocations included)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with (
        _stderr_to_devnull(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and str(node.extra_fields.device) == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))  # negative: a free
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def peak_mib(fn, device: str = "cuda") -> float:
    """MiB allocated above the inputs while fn() runs (max_memory_allocated; CPU: allocator
    events)."""
    if device == "cpu":
        return cpu_peak_bytes(fn) / 2**20
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def err_ratio(outs, refs, truths) -> str:
    worst = 0.0
    for o, r, t in zip(outs, refs, truths):
        t = t.double()
        e_out = (o.double() - t).abs().max().item()
        e_ref = (r.double() - t).abs().max().item()
        if e_out == 0.0:
            continue
        worst = max(worst, e_out / e_ref if e_ref > 0 else float("inf"))
    return "exact" if worst == 0.0 else f"{worst:.2f}"


def cases(n: int, dtype: torch.dtype, dev: str = "cuda"):
    """(op, bytes moved, make_state, run(backend, state), ref(state), truth(state),
    outputs(result))."""

    def rand(k, positive=False):
        return [
            (torch.rand if positive else torch.randn)(n, device=dev, dtype=torch.float64).to(dtype)
            for _ in range(k)
        ]

    es = torch.empty((), dtype=dtype).element_size()
    yield (
        "richardson_step",
        4 * n * es,
        lambda: rand(3),
        lambda b, s: richardson_step(*s, 0.7, 1.0, backend=b),
        lambda s: richardson_step_ref(*s, 0.7, 1.0),
        lambda s: richardson_step_ref(*(x.double() for x in s), 0.7, 1.0)[:1],
        lambda r: r[:1],
    )
    yield (
        "fd_perturb",
        4 * n * es,
        lambda: rand(2),
        lambda b, s: fd_perturb(*s, 1e-3, backend=b),
        lambda s: fd_perturb_ref(*s, 1e-3),
        lambda s: fd_perturb_ref(*(x.double() for x in s), 1e-3),
        lambda r: r,
    )
    yield (
        "fd_combine",
        3 * n * es,
        lambda: rand(2),
        lambda b, s: (fd_combine(*s, 1e-3, backend=b),),
        lambda s: (fd_combine_ref(*s, 1e-3),),
        lambda s: (fd_combine_ref(*(x.double() for x in s), 1e-3),),
        lambda r: r,
    )
    yield (
        "sgd_step",
        5 * n * es,
        lambda: rand(3),
        lambda b, s: (sgd_step(*s, **SGD, backend=b), s[0])[1:],
        lambda s: (sgd_step_ref(*s, **SGD), s[0])[1:],
        None,
        lambda r: r,
    )
    yield (
        "adam_step",
        7 * n * es,
        lambda: rand(3) + rand(1, positive=True),
        lambda b, s: (adam_step(*s, **ADAM, backend=b), s[0])[1:],
        lambda s: (adam_step_ref(*s, **ADAM), s[0])[1:],
        None,
        lambda r: r,
    )


def op_table(n: int, dtypes: list[str], reps: int, device: str = "cuda") -> Iterator[str]:
    """The op table's lines, one by one (printed as they come: a stage timeout keeps what was
    done)."""
    yield "| op | dtype | backend | ms | GB/s | peak MiB | speedup vs ref | err / ref err |"
    yield "|---|---|---|---|---|---|---|---|"
    for dname in dtypes:
        dtype = DTYPES[dname]
        for op, nbytes, make, run, ref, truth, outputs in cases(n, dtype, device):
            state = make()
            ref_ms = time_ms(functools.partial(ref, state), reps, device)
            for backend in BACKENDS[device]:
                reasons = registry.not_supported_reasons(op, backend, *state)
                if reasons:
                    yield (f"| {op} | {dname} | {backend} | - | - | - | - | {'; '.join(reasons)} |")
                    continue
                ms = time_ms(functools.partial(run, backend, state), reps, device)
                mib = peak_mib(functools.partial(run, backend, state), device)
                if truth is None:  # in-place steps: one step from the same state, vs fp64
                    s0 = make()
                    s_fast, s_ref, s_64 = (
                        [x.clone() for x in s0],
                        [x.clone() for x in s0],
                        [x.double() for x in s0],
                    )
                    run(backend, s_fast)
                    ref(s_ref)
                    (sgd_step_ref if op == "sgd_step" else adam_step_ref)(
                        *s_64, **(SGD if op == "sgd_step" else ADAM)
                    )
                    err = err_ratio(s_fast, s_ref, s_64)
                else:
                    s0 = make()
                    err = err_ratio(outputs(run(backend, s0)), outputs(ref(s0)), truth(s0))
                yield (
                    f"| {op} | {dname} | {backend} | {ms:.3f} | "
                    f"{nbytes / ms / 1e6:.{0 if n > 10**6 else 2}f} | "
                    f"{mib:.{0 if n > 10**6 else 3}f} | "
                    f"{ref_ms / ms:.2f}x | {err} |"
                )


def torch_optim_table(n: int, device: str = "cuda") -> Iterator[str]:
    """Max deviation from torch.optim after 3 steps, in units of eps(dtype) * (|after| +
    |before|)."""
    yield "| optimizer | dtype | backend | max deviation (2 = tolerance) |"
    yield "|---|---|---|---|"
    for dname in ("float32", "float64"):
        dtype = DTYPES[dname]
        for name in ("SGD", "AdamW"):
            for backend in BACKENDS[device]:
                reasons = registry.not_supported_reasons(
                    "sgd_step", backend, torch.empty(1, device=device, dtype=dtype)
                )
                if reasons:
                    yield (f"| {name} | {dname} | {backend} | {'; '.join(reasons)} |")
                    continue
                p0 = torch.randn(n, device=device, dtype=dtype)
                p_t, p = p0.clone().requires_grad_(), p0.clone()
                bufs = [torch.zeros_like(p0) for _ in range(2)]
                opt = (
                    torch.optim.SGD([p_t], lr=1e-2, momentum=0.9, weight_decay=1e-2, foreach=False)
                    if name == "SGD"
                    else torch.optim.AdamW([p_t], lr=1e-3, weight_decay=1e-2, foreach=False)
                )
                worst = 0.0
                for step in range(1, 4):
                    g = torch.randn(n, device=device, dtype=dtype)
                    p_t.grad = g.clone()
                    before = p.clone()
                    opt.step()
                    if name == "SGD":
                        sgd_step(
                            p,
                            g,
                            bufs[0],
                            lr=1e-2,
                            momentum=0.9,
                            weight_decay=1e-2,
                            first_step=step == 1,
                            backend=backend,
                        )
                    else:
                        adam_step(
                            p,
                            g,
                            *bufs,
                            step=step,
                            lr=1e-3,
                            beta1=0.9,
                            beta2=0.999,
                            eps=1e-8,
                            weight_decay=1e-2,
                            decoupled=True,
                            backend=backend,
                        )
                    want = p_t.detach()
                    scale = torch.finfo(dtype).eps * (want.abs() + before.abs())
                    worst = max(
                        worst,
                        ((p - want).abs() / scale.clamp_min(torch.finfo(dtype).tiny)).max().item(),
                    )
                    p.copy_(want)
                    if name == "SGD":
                        bufs[0].copy_(opt.state[p_t]["momentum_buffer"])
                    else:
                        bufs[0].copy_(opt.state[p_t]["exp_avg"])
                        bufs[1].copy_(opt.state[p_t]["exp_avg_sq"])
                yield (f"| {name} | {dname} | {backend} | {worst:.2f} |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--n",
        type=int,
        default=33_554_467,
        help="elements per buffer (odd on purpose; the default, 128 MiB of fp32, is well beyond "
        "the "
        "H200's 50 MB L2, so the ops are bandwidth-bound)",
    )
    parser.add_argument(
        "--dtypes", nargs="+", default=["float32", "float64", "bfloat16"], choices=sorted(DTYPES)
    )
    parser.add_argument("--reps", type=int, default=10, help="timed runs per cell (median)")
    parser.add_argument(
        "--device",
        default="cuda",
        choices=("cuda", "cpu"),
        help="cpu: the rehearsal of gpu_check.sh (cpp backend added, CUDA rows say why they cannot "
        "run)",
    )
    parser.add_argument(
        "--no-jit",
        action="store_true",
        help="do not JIT-build missing CUDA kernels: print the table without them (their rows give "
        "the reason) and exit with status 2",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    status = 0
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print(
                "gpu_ops.py needs a CUDA device (--device cpu for the CPU rehearsal)",
                file=sys.stderr,
            )
            return 2
        if registry.extension_reasons("richardson_step_cuda"):
            if args.no_jit:
                print(
                    "resalign_fast._C has no CUDA kernels: "
                    + "; ".join(registry.extension_reasons("richardson_step_cuda"))
                    + " (--no-jit: the table follows without them; exit status 2)",
                    file=sys.stderr,
                    flush=True,
                )
                status = 2
            else:
                print(f"JIT-built the CUDA extension in {jit_build_extension():.0f} s")
        where = torch.cuda.get_device_name()
    else:
        interp = os.environ.get("TRITON_INTERPRET", "0")
        where = f"CPU ({torch.get_num_threads()} threads), TRITON_INTERPRET={interp}"
    print(f"{where}, torch {torch.__version__}, n = {args.n:,}\n", flush=True)
    for line in op_table(args.n, args.dtypes, args.reps, args.device):
        print(line, flush=True)
    print()
    for line in torch_optim_table(min(args.n, 10_000_003), args.device):
        print(line, flush=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
