"""Fused ops per backend on a CUDA device, against their plain-torch references: a markdown table.

    python benchmarks/gpu_ops.py [--n 100000003] [--dtypes float32 bfloat16] [--reps 20]

Needs resalign_fast._C built with CUDA (`pip install --no-build-isolation .` on the GPU machine, or
`python setup.py build_ext --inplace`); without it the script JIT-builds the same sources with
torch.utils.cpp_extension.load (about 2 minutes on 16 cores) unless --no-jit. Columns: median
milliseconds over --reps runs after a warm-up (CUDA events), GB/s of the bytes the fused op must
move, torch.cuda.max_memory_allocated above the inputs, speedup against the reference timed the same
way, and the error rule of the tests: max |out - fp64 truth| divided by the reference's (<= 2 passes;
"exact" when both are 0). A second table compares sgd_step/adam_step with torch.optim (foreach=False).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from resalign_fast.ops import registry  # noqa: E402
from resalign_fast.ops.fd_hvp import fd_combine, fd_combine_ref, fd_perturb, fd_perturb_ref  # noqa: E402
from resalign_fast.ops.optim_step import adam_step, adam_step_ref, sgd_step, sgd_step_ref  # noqa: E402
from resalign_fast.ops.richardson_step import richardson_step, richardson_step_ref  # noqa: E402

BACKENDS = ("torch", "cuda", "triton")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
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
    setup.write_build_info(build / "generated" / "resalign_build_info.h", "cuda", "torch.utils.cpp_extension.load")
    start = time.perf_counter()
    module = load(
        name="_C", sources=[str(ROOT / "csrc" / s) for s in setup.CPU_SOURCES + setup.CUDA_SOURCES],
        extra_cflags=setup.CXX_FLAGS + ["-DRESALIGN_WITH_CUDA"], extra_cuda_cflags=setup.NVCC_FLAGS + ["-DRESALIGN_WITH_CUDA"],
        extra_ldflags=setup.LINK_FLAGS, extra_include_paths=[str(ROOT / "csrc"), str(build / "generated")],
        build_directory=str(build), verbose=False,
    )
    sys.modules["resalign_fast._C"] = module
    registry._EXT, registry._EXT_ERROR = module, None
    return time.perf_counter() - start


def time_ms(fn, reps: int) -> float:
    fn()
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


def peak_mib(fn) -> float:
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


def cases(n: int, dtype: torch.dtype):
    """(op, bytes moved, make_state, run(backend, state), ref(state), truth(state), outputs(result))."""
    dev = "cuda"

    def rand(k, positive=False):
        return [(torch.rand if positive else torch.randn)(n, device=dev, dtype=torch.float64).to(dtype) for _ in range(k)]

    es = torch.empty((), dtype=dtype).element_size()
    yield ("richardson_step", 4 * n * es, lambda: rand(3),
           lambda b, s: richardson_step(*s, 0.7, 1.0, backend=b), lambda s: richardson_step_ref(*s, 0.7, 1.0),
           lambda s: richardson_step_ref(*(x.double() for x in s), 0.7, 1.0)[:1], lambda r: r[:1])
    yield ("fd_perturb", 4 * n * es, lambda: rand(2),
           lambda b, s: fd_perturb(*s, 1e-3, backend=b), lambda s: fd_perturb_ref(*s, 1e-3),
           lambda s: fd_perturb_ref(*(x.double() for x in s), 1e-3), lambda r: r)
    yield ("fd_combine", 3 * n * es, lambda: rand(2),
           lambda b, s: (fd_combine(*s, 1e-3, backend=b),), lambda s: (fd_combine_ref(*s, 1e-3),),
           lambda s: (fd_combine_ref(*(x.double() for x in s), 1e-3),), lambda r: r)
    yield ("sgd_step", 5 * n * es, lambda: rand(3),
           lambda b, s: (sgd_step(*s, **SGD, backend=b), s[0])[1:], lambda s: (sgd_step_ref(*s, **SGD), s[0])[1:],
           None, lambda r: r)
    yield ("adam_step", 7 * n * es, lambda: rand(3) + rand(1, positive=True),
           lambda b, s: (adam_step(*s, **ADAM, backend=b), s[0])[1:], lambda s: (adam_step_ref(*s, **ADAM), s[0])[1:],
           None, lambda r: r)


def op_table(n: int, dtypes: list[str], reps: int) -> list[str]:
    rows = ["| op | dtype | backend | ms | GB/s | peak MiB | speedup vs ref | err / ref err |",
            "|---|---|---|---|---|---|---|---|"]
    for dname in dtypes:
        dtype = DTYPES[dname]
        for op, nbytes, make, run, ref, truth, outputs in cases(n, dtype):
            state = make()
            ref_ms = time_ms(lambda: ref(state), reps)
            for backend in BACKENDS:
                reasons = registry.not_supported_reasons(op, backend, *state)
                if reasons:
                    rows.append(f"| {op} | {dname} | {backend} | - | - | - | - | {'; '.join(reasons)} |")
                    continue
                ms = time_ms(lambda: run(backend, state), reps)
                mib = peak_mib(lambda: run(backend, state))
                if truth is None:  # in-place steps: one step from the same state, vs fp64
                    s0 = make()
                    s_fast, s_ref, s_64 = [x.clone() for x in s0], [x.clone() for x in s0], [x.double() for x in s0]
                    run(backend, s_fast)
                    ref(s_ref)
                    (sgd_step_ref if op == "sgd_step" else adam_step_ref)(*s_64, **(SGD if op == "sgd_step" else ADAM))
                    err = err_ratio(s_fast, s_ref, s_64)
                else:
                    s0 = make()
                    err = err_ratio(outputs(run(backend, s0)), outputs(ref(s0)), truth(s0))
                rows.append(f"| {op} | {dname} | {backend} | {ms:.3f} | {nbytes / ms / 1e6:.0f} | {mib:.0f} | "
                            f"{ref_ms / ms:.2f}x | {err} |")
    return rows


def torch_optim_table(n: int) -> list[str]:
    """Max deviation from torch.optim after 3 steps, in units of eps(dtype) * (|after| + |before|)."""
    rows = ["| optimizer | dtype | backend | max deviation (2 = tolerance) |", "|---|---|---|---|"]
    for dname in ("float32", "float64"):
        dtype = DTYPES[dname]
        for name in ("SGD", "AdamW"):
            for backend in BACKENDS:
                reasons = registry.not_supported_reasons("sgd_step", backend, torch.empty(1, device="cuda", dtype=dtype))
                if reasons:
                    rows.append(f"| {name} | {dname} | {backend} | {'; '.join(reasons)} |")
                    continue
                p0 = torch.randn(n, device="cuda", dtype=dtype)
                p_t, p = p0.clone().requires_grad_(), p0.clone()
                bufs = [torch.zeros_like(p0) for _ in range(2)]
                opt = (torch.optim.SGD([p_t], lr=1e-2, momentum=0.9, weight_decay=1e-2, foreach=False) if name == "SGD"
                       else torch.optim.AdamW([p_t], lr=1e-3, weight_decay=1e-2, foreach=False))
                worst = 0.0
                for step in range(1, 4):
                    g = torch.randn(n, device="cuda", dtype=dtype)
                    p_t.grad = g.clone()
                    before = p.clone()
                    opt.step()
                    if name == "SGD":
                        sgd_step(p, g, bufs[0], lr=1e-2, momentum=0.9, weight_decay=1e-2, first_step=step == 1, backend=backend)
                    else:
                        adam_step(p, g, *bufs, step=step, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2,
                                  decoupled=True, backend=backend)
                    want = p_t.detach()
                    scale = torch.finfo(dtype).eps * (want.abs() + before.abs())
                    worst = max(worst, ((p - want).abs() / scale.clamp_min(torch.finfo(dtype).tiny)).max().item())
                    p.copy_(want)
                    if name == "SGD":
                        bufs[0].copy_(opt.state[p_t]["momentum_buffer"])
                    else:
                        bufs[0].copy_(opt.state[p_t]["exp_avg"])
                        bufs[1].copy_(opt.state[p_t]["exp_avg_sq"])
                rows.append(f"| {name} | {dname} | {backend} | {worst:.2f} |")
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000_003, help="elements per buffer (odd on purpose)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--reps", type=int, default=20, help="timed runs per cell (median)")
    parser.add_argument("--no-jit", action="store_true", help="fail instead of JIT-building the CUDA kernels")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_ops.py needs a CUDA device", file=sys.stderr)
        return 2
    if registry.extension_reasons("richardson_step_cuda"):
        if args.no_jit:
            print("resalign_fast._C has no CUDA kernels: " + "; ".join(registry.extension_reasons("richardson_step_cuda")),
                  file=sys.stderr)
            return 2
        print(f"JIT-built the CUDA extension in {jit_build_extension():.0f} s")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, n = {args.n:,}\n")
    print("\n".join(op_table(args.n, args.dtypes, args.reps)))
    print()
    print("\n".join(torch_optim_table(min(args.n, 10_000_003))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
