"""Memory planner: how long an estimate takes, and estimates against measured peaks.

    python -m pytest benchmarks/bench_memory_plan.py --benchmark-only -s
    python benchmarks/bench_memory_plan.py --gpu [--out results.json]      (on a CUDA machine)

CPU (pytest): the time to trace one SD v1.4 outer step on meta tensors, and on the tiny UNet the
estimate against the CPU allocator's measured peak for the same step (ratio estimate / measured).
GPU (`--gpu`): SD v1.4's UNet (random weights, fp32) runs real outer steps at 512 px, batch 1;
`torch.cuda.max_memory_allocated` is compared with the estimate for the same recipe and
configuration, traced in the same run. The project's fused ops run their plain-torch path in both
(`reference_ops`), so the two execute the same operations.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import pytest
import torch

from resalign_fast.memplan.estimate import Estimator, measure
from resalign_fast.memplan.meta import reference_ops
from resalign_fast.memplan.recipes import PI_C, REFERENCE, Recipe, StepShape
from resalign_fast.memplan.trainer import build_trainer, trainer_step
from resalign_fast.memplan.unets import MODELS, build_unet

CONFIGS = {c.name: c for c in PI_C}
GPU_CASES = [  # (recipe, configuration): chosen to span 4 to 50 GiB estimated
    (Recipe("fd/fused/ckpt", "fd", "fused", True), "lora-sgd-standard"),
    (Recipe("exact/chunked/ckpt", "exact", "chunked", True), "lora-sgd-dreambooth"),
    (Recipe("jvp/fused/no-ckpt", "jvp", "fused", False), "lora-sgd-standard"),
    (REFERENCE, "lora-sgd-standard"),
    (REFERENCE, "lora-adam-dreambooth"),
    (Recipe("fd/fused/ckpt", "fd", "fused", True), "full-adam-dreambooth"),
    (
        Recipe("fd/fused/ckpt/lean-full", "fd", "fused", True, lean_full=True),
        "full-adam-dreambooth",
    ),
    (Recipe("exact/fused/no-ckpt", "exact", "fused", False), "full-sgd-standard"),
    (REFERENCE, "full-adam-standard"),
    (REFERENCE, "full-adam-dreambooth"),
]


def test_trace_time_sd_v1_4(benchmark):
    est = Estimator("sd-v1-4", StepShape(), target="cuda")
    recipe = Recipe("fd/fused/ckpt", "fd", "fused", True)
    out = benchmark.pedantic(
        lambda: est.run(recipe, CONFIGS["lora-sgd-standard"]), rounds=1, iterations=1
    )
    benchmark.extra_info.update({"estimate_gib": out.peak / 2**30, "trace_seconds": out.seconds})
    print(
        f"\nSD v1.4 512 px fd/fused/ckpt lora-sgd-standard: {out.peak / 2**30:.2f} GiB, traced in "
        f"{out.seconds:.1f} s"
    )
    assert out.peak is not None


@pytest.mark.parametrize(
    "recipe,config",
    [(REFERENCE, "lora-sgd-standard"), (Recipe("fd", "fd", "fused", True), "full-adam-standard")],
)
def test_estimate_vs_cpu_allocator_tiny(benchmark, recipe, config):
    spec, shape = MODELS["tiny"], StepShape(resolution=16, batch=2, iters=3)
    est = Estimator(spec, shape, block=1, target="cpu")
    e = benchmark.pedantic(lambda: est.run(recipe, CONFIGS[config]), rounds=1, iterations=1)
    m = measure(build_unet(spec), spec, recipe, CONFIGS[config], shape)
    ratio = e.peak / m["allocator"]
    benchmark.extra_info.update({"estimate": e.peak, "measured": m["allocator"], "ratio": ratio})
    print(
        f"\ntiny {recipe.name} {config}: estimate {e.peak} B, measured {m['allocator']} B, ratio "
        f"{ratio:.3f}"
    )
    assert 0.85 <= ratio <= 1.15


def gpu_check(
    cases=GPU_CASES, shape: StepShape = StepShape(), model: str = "sd-v1-4", estimate: bool = True
) -> list[dict]:
    """Measure the trainer's real outer steps on the GPU next to their estimates (see module doc).

    Args:
        cases: (recipe, configuration name) pairs.
        shape: step sizes.
        model: built-in UNet config.
        estimate: also trace the estimate here (else compare with a saved planner run).
    """
    spec = MODELS[model]
    est = Estimator(spec, shape, target="cuda")
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    rows = []
    for recipe, name in cases:
        e = est.run(recipe, CONFIGS[name]) if estimate else None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated() if cuda else 0
        t0 = time.perf_counter()
        err = ""
        try:
            with torch.device(dev):
                unet = build_unet(spec)  # a fresh one: the trainer adds its adapter to it
            with reference_ops():
                trainer_step(
                    build_trainer(unet, spec, recipe, CONFIGS[name], shape, device=dev.type)
                )
            if cuda:
                torch.cuda.synchronize()
        except Exception as ex:  # an out-of-memory or unsupported case is a row, not a crash
            err = f"{type(ex).__name__}: {str(ex).splitlines()[0][:160]}"
        unet = None
        measured = torch.cuda.max_memory_allocated() if cuda else 0
        rows.append(
            {
                "recipe": recipe.name,
                "config": name,
                "estimate": e and e.peak,
                "measured": measured,
                "reserved": torch.cuda.max_memory_reserved() if cuda else 0,
                "start": start,
                "seconds": round(time.perf_counter() - t0, 2),
                "error": err,
                "ratio": round(e.peak / measured, 4)
                if e and e.peak and measured and not err
                else None,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="measure SD v1.4 outer steps on the GPU")
    ap.add_argument("--out", default="", help="write the rows as JSON here")
    ap.add_argument(
        "--no-estimate", action="store_true", help="measure only (compare with a saved planner run)"
    )
    a = ap.parse_args()
    if not a.gpu or not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device; the CPU benchmarks run under pytest")
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "rows": gpu_check(estimate=not a.no_estimate),
    }
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
