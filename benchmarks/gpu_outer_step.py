"""GPU table: one real ResAlign outer step per memory recipe on an SD v1.4-shaped UNet, next to the
memory planner's estimate of the same step. Part of benchmarks/gpu_check.sh.

    python benchmarks/gpu_outer_step.py [--resolution 64] [--algorithms lora full] [--recipes ...]
    python benchmarks/gpu_outer_step.py --device cpu --model small --resolution 8 \\
        --plan-jobs 1 --plan-first
                                                                          (the CPU rehearsal)

Random-initialised SD v1.4 UNet (860M parameters), 64x64 latents (512 px), batch 1, rank-4 LoRA on
every attention layer, one sampled configuration (Adam, 2 simulated steps; LoRA or full-parameter
fine-tuning) and K = 5 Richardson iterations. Per recipe: the peak torch.cuda.max_memory_allocated
of the step (UNet and data resident, counted from after they are), the seconds of the step, the
ratios and the hypergradient cosine against the reference recipe (fp32, math attention, double
backward, no checkpointing) measured in the same run, and the memory planner's estimate of the
same step: `Estimator(...).run`, which traces the trainer's own `ResAlign.step` on meta
tensors with the same configuration fields, so every recipe maps to a planner recipe exactly.

The planner traces on the CPU. On the GPU (--plan-jobs > 0, the default there) the estimates run in
worker processes while the GPU measures; --plan-first waits for them before measuring instead (the
CPU rehearsal: one busy process at a time). --plan-jobs 0 traces them here after the measurements.

Each recipe gets a UNet made directly on the device and loaded with the weights of one CPU-built
model (making SD v1.4's 860M parameters on the CPU takes about 10 s: once, not once per recipe).
--budget stops starting new recipes when the next one would not finish in time (the stage's
timeout in gpu_check.sh would otherwise lose the whole table); skipped recipes are listed, and
the exit status is then 3. A recipe that fails is listed with its error (exit status 1); an
estimate missing for a recipe that ran gives exit status 4.

--device cpu --model small: SD's block structure scaled down (outer_step.SD_SMALL_UNET), peaks from
the storage tracker on the real CPU tensors (outer_step.cpu_peak; what the lean path keeps in host
memory is left out, as on a GPU), the planner with exact byte counts and CPU kernels.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

T0 = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent))
import outer_step  # noqa: E402
from outer_step import (  # noqa: E402
    RECIPES,
    SD14_UNET,
    SD_SMALL_UNET,
    cuda_peak,
    ft_space_file,
    prepare,
    run_step,
)  # noqa: E402

# The trainer's in-place path for full-parameter configurations (config field lean_full: the
# starting weights in host memory, the optimizer step inside the backward pass, in-place fd HVPs).
# For LoRA configurations it changes nothing (it is lean-fd-ckpt), so it runs for full ones only.
RECIPES.setdefault(
    "lean-fd-ckpt-full",
    dict(attention="auto", hvp="fd", gradient_checkpointing=True, lean_full=True),
)
FULL_ONLY = ("lean-fd-ckpt-full",)
# in order of interest: --budget drops the last ones first
DEFAULT_RECIPES = ["reference", "lean-fd", "lean-fd-ckpt-full", "lean-fd-ckpt", "lean-exact-ckpt"]
MODELS = {
    "sd14": ("SD v1.4-shaped UNet", SD14_UNET),
    "small": ("SD-structured small UNet (outer_step.SD_SMALL_UNET)", SD_SMALL_UNET),
}
TEXT_LEN = 77  # outer_step.build_model's prompt length
MIB = 2**20


# -- the model, made once ----------------------------------------------------------------------
class FreshUNets:
    """Replaces outer_step.build_model: the first call builds the model on the CPU as before; every
    call returns it with a fresh UNet made on `device` and loaded with the same weights (the text
    encoder, tokenizer and scheduler are shared: frozen, and only the UNet moves to the device).

    The random number generators are left as build_model leaves them (the CPU generator's state
    after the build, CUDA's seeded): theta's LoRA initialisation and the step's draws depend on
    them, and every recipe must start from the same theta for the cosine column to mean anything."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.base: dict[tuple, tuple[object, torch.Tensor]] = {}
        self.build = outer_step.build_model

    def prebuild(self, unet_config: dict, seed: int = 0, text_len: int = TEXT_LEN) -> tuple:
        """The CPU-built model and the CPU generator's state after building it (built on first
        use)."""
        key = (repr(sorted(unet_config.items())), seed, text_len)
        if key not in self.base:
            model = self.build(
                unet_config, seed, text_len
            )  # seeds every generator, then draws on the CPU one
            self.base[key] = (model, torch.get_rng_state())
        return self.base[key]

    def __call__(self, unet_config: dict, seed: int = 0, text_len: int = TEXT_LEN):
        from diffusers import UNet2DConditionModel

        base, rng = self.prebuild(unet_config, seed, text_len)
        try:
            with torch.device(self.device):
                unet = UNet2DConditionModel.from_config(base.unet.config)
        except Exception:  # noqa: BLE001 - made on the CPU then, and moved by prepare()
            unet = UNet2DConditionModel.from_config(base.unet.config)
        unet.load_state_dict(base.unet.state_dict())
        torch.set_rng_state(rng)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)  # as torch.manual_seed(seed) in build_model left it
        return dataclasses.replace(base, unet=unet.train(), _emb_cache={})


def cpu_peak_host(algo, fn):
    """outer_step.cpu_peak, except that what the trainer puts in host memory
    (inner.inplace.host_empty: lean_full's backup of the starting weights) is not counted, as on a
    GPU (it is pinned host memory there, outside max_memory_allocated) and as in the planner."""
    from resalign_fast.memplan.tracker import StorageTracker
    from resalign_fast.memplan.trainer import host_allocations

    with StorageTracker(block=1) as tr:
        tr.register(list(algo.space.unet.parameters()) + list(algo.space.unet.buffers()))
        tr.register([t for d in algo.data.values() for t in (d.x0, d.emb)])
        with host_allocations(tr.host):
            out = fn()
    return out, tr.report().peak


# -- the planner -------------------------------------------------------------------------------
def bench_guard(name: str) -> str:
    """The guard recipe `name` runs with: its own field, else the trainer's default."""
    from resalign_fast.config import ResAlignConfig

    return RECIPES[name].get("guard", ResAlignConfig().guard)


def planner_recipe(name: str):
    """The planner Recipe of benchmark recipe `name`, and how well it matches.

    `recipes.trainer_config` passes hvp, gradient checkpointing, lean_full and split_terms to
    ResAlignConfig as they are, attention "fused" as "lean", and the estimator's guard
    (`bench_guard`), so every benchmark recipe has an exact counterpart."""
    from resalign_fast.memplan.recipes import Recipe

    r = RECIPES[name]
    math, ckpt, lean = (
        r["attention"] == "math",
        r["gradient_checkpointing"],
        r.get("lean_full", False),
    )
    label = (
        f"{r['hvp']}/{'math' if math else 'auto'}/{'ckpt' if ckpt else 'no-ckpt'}"
        + ("/lean-full" if lean else "")
        + f", guard {bench_guard(name)}"
    )
    return Recipe(
        label,
        hvp=r["hvp"],
        attention="math" if math else "fused",
        checkpointing=ckpt,
        lean_full=lean,
    ), "exact"


def estimate_task(
    unet_config: dict, latent: int, name: str, algo: str, target: str, block: int
) -> dict:
    """The planner's peak (bytes) for recipe `name` on configuration (algo, adam, standard); runs
    in a worker process. Never raises: a failure is returned as the error text."""
    t0 = time.perf_counter()
    try:
        torch.set_num_threads(1)
        from resalign_fast.memplan.estimate import Estimator
        from resalign_fast.memplan.recipes import ConfigKind, StepShape
        from resalign_fast.memplan.unets import ModelSpec

        spec = ModelSpec(dict(unet_config), text_len=TEXT_LEN, vae_factor=8)
        shape = StepShape(batch=1, resolution=latent * 8, iters=5, sim_steps=2)
        try:
            spec.latent_shape(1, shape.resolution)
        except ValueError as e:
            return dict(
                peak=None,
                error=f"latents {latent}x{latent} do not map to the planner: {e}",
                seconds=0.0,
            )
        recipe, _ = planner_recipe(name)
        est = Estimator(spec, shape, block=block, target=target, guard=bench_guard(name))
        p = est.run(recipe, ConfigKind(algo, "adam", "standard"))
        return dict(peak=p.peak, error=p.error, seconds=time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - reported in the table
        return dict(
            peak=None,
            error=f"{type(e).__name__}: "
            f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}",
            seconds=time.perf_counter() - t0,
        )


class Planner:
    """Estimates for (algo, recipe) keys: in `jobs` spawned worker processes, or here when jobs
    is 0."""

    INLINE_SECONDS = 20  # an estimate traced here needs about this long at SD v1.4 scale

    def __init__(self, tasks: dict[tuple[str, str], tuple], jobs: int) -> None:
        self.tasks, self.done, self.pool, self.pending = tasks, {}, None, {}
        if jobs > 0 and tasks:
            # spawn, not fork: the parent initialises CUDA, which a forked child must not inherit
            try:
                self.pool = multiprocessing.get_context("spawn").Pool(min(jobs, len(tasks)))
                self.pending = {
                    k: self.pool.apply_async(estimate_task, args) for k, args in tasks.items()
                }
            except Exception as e:  # noqa: BLE001 - traced here after the measurements instead
                print(
                    f"planner: no worker processes ({type(e).__name__}: {e}); tracing here after "
                    f"measuring",
                    flush=True,
                )
                self.pool = None

    def get(self, key: tuple[str, str], timeout: float) -> dict:
        """The estimate for key, waiting at most `timeout` seconds (traced here when there is no
        pool, if that much time is left)."""
        if key not in self.done:
            if self.pool is None:
                if timeout < self.INLINE_SECONDS:
                    return dict(
                        peak=None, error=f"no time left to trace it ({timeout:.0f} s)", seconds=0.0
                    )
                self.done[key] = estimate_task(*self.tasks[key])
            else:
                try:
                    self.done[key] = self.pending[key].get(timeout=max(0.1, timeout))
                except multiprocessing.TimeoutError:
                    return dict(
                        peak=None,
                        error=f"still tracing {time.perf_counter() - T0:.0f} s after the start",
                        seconds=0.0,
                    )
                except Exception as e:  # noqa: BLE001 - a worker that died
                    self.done[key] = dict(peak=None, error=f"{type(e).__name__}: {e}", seconds=0.0)
        return self.done[key]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


# -- measuring ---------------------------------------------------------------------------------
def recipes_for(algo: str, recipes: list[str]) -> list[str]:
    return [r for r in recipes if algo == "full" or r not in FULL_ONLY]


def measure(
    cfg: dict, algos: list[str], recipes: list[str], device: str, measure_peak, end: float
) -> list[dict]:
    """Rows (algo, recipe, peak, seconds, cosine vs reference, ...), recipe by recipe, in order.
    The time left until `end` (perf_counter) is shared between the algorithms still to run; a
    recipe is skipped when the longest recipe so far (model, step and clean-up) would not fit
    before its algorithm's share ends."""
    rows, longest = [], 0.0
    with tempfile.TemporaryDirectory() as d:
        for i, algo in enumerate(algos):
            now = time.perf_counter()
            deadline = now + (end - now) / (len(algos) - i)
            ft = ft_space_file(Path(d) / f"{algo}.toml", algorithm=algo)
            ref, names = None, recipes_for(algo, recipes)
            for name in names:
                row = dict(algo=algo, recipe=name)
                rows.append(row)
                start = time.perf_counter()
                if start + longest > deadline:
                    row["skipped"] = (
                        f"time budget: {deadline - start:.0f} s left for {algo}, the longest "
                        f"recipe took {longest:.0f} s"
                    )
                    print(f"skipped {algo}/{name}: {row['skipped']}", flush=True)
                    continue
                algo_obj = None
                try:
                    algo_obj = prepare(name, cfg, ft, device)
                    (res, dt, g), peak = measure_peak(algo_obj, lambda a=algo_obj: run_step(a))
                    row.update(
                        peak=peak, seconds=dt, g=g, fallbacks=res.fallbacks, retries=res.retries
                    )
                    if name == names[0]:
                        ref = row
                    print(
                        f"measured {algo}/{name}: peak {peak / MIB:.1f} MiB, {dt:.2f} s "
                        f"(fallbacks {res.fallbacks}, retries {res.retries}; "
                        f"{time.perf_counter() - T0:.0f} s since the start)",
                        flush=True,
                    )
                except Exception as e:  # noqa: BLE001 - reported in the table, the others still run
                    msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
                    row["error"] = f"{type(e).__name__}: {msg}"
                    print(f"FAILED {algo}/{name}: {row['error']}", flush=True)
                finally:
                    del algo_obj
                    gc.collect()
                    if device == "cuda":
                        torch.cuda.empty_cache()
                longest = max(longest, time.perf_counter() - start)
            for row in rows:
                if row["algo"] == algo and "peak" in row and ref is not None:
                    row["peak_ratio"] = row["peak"] / ref["peak"]
                    row["time_ratio"] = row["seconds"] / ref["seconds"]
                    row["cosine"] = torch.nn.functional.cosine_similarity(
                        row["g"].double(), ref["g"].double(), dim=0
                    ).item()
    return rows


def table(rows: list[dict]) -> str:
    head = (
        "| recipe | peak MiB | peak / reference | s / outer step | time / reference | "
        "hypergradient cosine vs reference "
        "| guard fallbacks / retries | planner recipe | match | planner MiB | planner / measured "
        "|\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = ""
    for r in rows:
        rec, match = planner_recipe(r["recipe"])
        if "peak" not in r:
            why = r.get("error") or f"skipped ({r.get('skipped')})"
            body += (
                f"| {r['recipe']} | {why} | - | - | - | - | - | {rec.name} | {match} | - | - |\n"
            )
            continue
        est = r.get("estimate") or {}
        if est.get("peak"):
            plan, ratio = f"{est['peak'] / MIB:.1f}", f"{est['peak'] / r['peak']:.3f}"
        else:
            plan, ratio = f"n/a ({est.get('error') or 'no estimate'})", "n/a"

        def fmt(k: str, f: str, r: dict = r) -> str:
            return f"{r[k]:{f}}" if k in r else "n/a"

        body += (
            f"| {r['recipe']} | {r['peak'] / MIB:.1f} | {fmt('peak_ratio', '.3f')} | "
            f"{r['seconds']:.2f} | "
            f"{fmt('time_ratio', '.2f')} | {fmt('cosine', '.6f')} | {r['fallbacks']} / "
            f"{r['retries']} | {rec.name} | "
            f"{match} | {plan} | {ratio} |\n"
        )
    return head + body


def warm_up(device: str) -> float:
    """One small step of the reference and of a lean recipe (CUDA context, cuBLAS and cuDNN handles,
    allocator pools), so that the first recipe timed does not pay for them."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        ft = ft_space_file(Path(d) / "warm.toml", algorithm="lora")
        for name in ("reference", "lean-fd"):
            algo = prepare(name, dict(SD_SMALL_UNET, sample_size=16), ft, device)
            run_step(algo)
            del algo
    gc.collect()
    torch.cuda.empty_cache()
    return time.perf_counter() - t0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--device",
        default="cuda",
        choices=("cuda", "cpu"),
        help="cpu: the rehearsal of gpu_check.sh",
    )
    p.add_argument(
        "--model",
        default=None,
        choices=sorted(MODELS),
        help="sd14 (SD v1.4's UNet; default on cuda) or small (SD_SMALL_UNET; default on cpu)",
    )
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="latent size (64 = 512 px; default 64 for sd14, 16 for small); a multiple of 8 maps "
        "to the planner",
    )
    p.add_argument("--algorithms", nargs="+", default=["lora", "full"], choices=("lora", "full"))
    p.add_argument(
        "--recipes",
        nargs="+",
        default=DEFAULT_RECIPES,
        choices=list(RECIPES),
        help="the first is the ratios' baseline; lean-fd-ckpt-full runs for full configs only",
    )
    p.add_argument(
        "--plan-jobs",
        type=int,
        default=None,
        help="planner worker processes (default on cuda: half the CPUs, at most 8; on cpu 0: "
        "traced here, "
        "after measuring)",
    )
    p.add_argument(
        "--plan-first", action="store_true", help="wait for the estimates before measuring"
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds from the start by which the last recipe should end (default: 125 on cuda, "
        "where "
        "gpu_check.sh allows 150 s; none on cpu)",
    )
    p.add_argument("--no-warmup", action="store_true", help="cuda: skip the small warm-up step")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    dev = a.device
    model = a.model or ("sd14" if dev == "cuda" else "small")
    latent = a.resolution or (64 if model == "sd14" else 16)
    budget = a.budget if a.budget is not None else (125.0 if dev == "cuda" else float("inf"))
    if a.recipes[0] != "reference":
        print(f"note: the ratios are against {a.recipes[0]}, the first recipe given")
    if dev == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_outer_step.py needs a CUDA device (--device cpu for the CPU rehearsal)")
    what, base = MODELS[model]
    cfg = dict(base, sample_size=latent)
    target, block = ("cuda", 512) if dev == "cuda" else ("cpu", 1)
    tasks = {
        (algo, r): (cfg, latent, r, algo, target, block)
        for algo in a.algorithms
        for r in recipes_for(algo, a.recipes)
    }
    ncpu = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    )
    jobs = (
        a.plan_jobs
        if a.plan_jobs is not None
        else (min(8, max(1, ncpu // 2)) if dev == "cuda" else 0)
    )
    planner = Planner(tasks, jobs)  # before CUDA is initialised
    try:
        if a.plan_first:
            for k in tasks:
                planner.get(
                    k,
                    timeout=max(1.0, T0 + budget - time.perf_counter())
                    if budget != float("inf")
                    else 3600,
                )
            print(
                f"planner: {len(tasks)} estimates in {time.perf_counter() - T0:.0f} s ({jobs} "
                f"worker processes)",
                flush=True,
            )
        if dev == "cuda":
            print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
        else:
            print(
                f"device: CPU ({torch.get_num_threads()} threads), torch {torch.__version__}",
                flush=True,
            )
        outer_step.build_model = fresh = FreshUNets(dev)
        if dev == "cuda" and not a.no_warmup:
            try:
                print(f"warm-up: {warm_up(dev):.1f} s", flush=True)
            except Exception as e:  # noqa: BLE001 - the recipes will say more
                print(f"warm-up failed: {type(e).__name__}: {e}", flush=True)
        t = time.perf_counter()
        fresh.prebuild(cfg)  # prepare() builds with seed 0: not timed as part of the first recipe
        print(
            f"model built on the CPU in {time.perf_counter() - t:.1f} s "
            f"({time.perf_counter() - T0:.0f} s since the start)",
            flush=True,
        )
        rows = measure(
            cfg,
            a.algorithms,
            a.recipes,
            dev,
            cuda_peak if dev == "cuda" else cpu_peak_host,
            T0 + budget,
        )
        for r in rows:  # estimates for the recipes that ran
            if "peak" in r:
                left = T0 + budget + 10 - time.perf_counter() if budget != float("inf") else 3600
                r["estimate"] = planner.get((r["algo"], r["recipe"]), timeout=left)
    finally:
        planner.close()
    kind = (
        "torch.cuda.max_memory_allocated, from after the UNet and data are resident (both included)"
        if dev == "cuda"
        else "live tensor bytes by the storage tracker on the real CPU tensors, UNet and data "
        "included"
    )
    plan = (
        f"Estimator(ModelSpec of this UNet config, StepShape(batch 1, {latent * 8} px, K 5, 2 "
        f"simulated steps), "
        f"block {block} B, target {target}).run: ResAlign.step traced on meta tensors"
    )
    for algo in a.algorithms:
        print(
            f"\n{what}, {latent}x{latent} latents, batch 1, {algo} fine-tuning config (adam, 2 "
            f"steps), K = 5:\n" + table([r for r in rows if r["algo"] == algo]),
            flush=True,
        )
    print(
        f'measured: {kind}; planner: {plan}. "exact": the planner runs the trainer\'s step with '
        f"the same "
        "config fields (attention math/auto, hvp, gradient_checkpointing, lean_full; guard, "
        "split_terms, K and "
        "one configuration per step as the benchmark); its data sets hold 1 example instead of 4 "
        "(under 4 MiB at "
        "SD v1.4 scale). lean_full's starting-weight backup lives in host memory and is in neither "
        "column. A guard "
        "fallback replaces the solve by the first-order term: where every recipe fell back, the "
        "cosine says nothing "
        "about the solve."
    )
    failed = [f"{r['algo']}/{r['recipe']}" for r in rows if "error" in r]
    skipped = [f"{r['algo']}/{r['recipe']}" for r in rows if "skipped" in r]
    no_est = [
        f"{r['algo']}/{r['recipe']}"
        for r in rows
        if "peak" in r and not (r.get("estimate") or {}).get("peak")
    ]
    print(
        f"outer step: {len(rows) - len(failed) - len(skipped)} of {len(rows)} recipes measured in "
        f"{time.perf_counter() - T0:.0f} s"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
        + (f"; skipped for time: {', '.join(skipped)}" if skipped else "")
        + (f"; no planner estimate: {', '.join(no_est)}" if no_est else "")
    )
    return 1 if failed else 3 if skipped else 4 if no_est else 0


if __name__ == "__main__":
    sys.exit(main())
