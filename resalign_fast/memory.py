"""Memory planner: estimated peak GPU memory of one ResAlign outer step, without weights or a GPU.

    python -m resalign_fast.memory --model sd-v1-4 --resolution 512 [--json]

The trainer's own outer step (`resalign_fast.bilevel.ResAlign.step`) runs for real, on meta tensors
(shapes and storages, no data), under a tracker of live storage bytes (`resalign_fast.memplan`):
nothing is computed by formula. Rows are recipes (the reference recipe, then every HVP backend x
attention x checkpointing), columns the memory-relevant configurations of pi(C).

What the estimate counts: tensor storages, each rounded up to 512 bytes (the CUDA caching
allocator's `max_memory_allocated`). What it leaves out: the CUDA context (~0.5 GiB), allocator
fragmentation and segment rounding (`memory_reserved` is higher), and workspaces that kernels
allocate internally (cuBLAS, cuDNN convolution algorithms, the fused attention backward).

Flags in more words: `--sim_steps` 1 already gives the peak (no graph is kept between simulated
steps); `--weights` sets our recipes' frozen base weights (the reference recipe stays fp32);
`--no_lean` drops the two lean_full rows (in-place full-parameter configurations with fd HVPs,
the optimizer state on the device, then offloaded to host memory); `--attention fused` is the
trainer's `attention = "lean"` (fused first-order passes, chunked second-order ones).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace

from resalign_fast.memplan.estimate import Estimator
from resalign_fast.memplan.recipes import (
    ATTENTION,
    HVP_BACKENDS,
    PI_C,
    REFERENCE,
    ConfigKind,
    Recipe,
    StepShape,
)
from resalign_fast.memplan.report import GIB, PAPER_PEAK_GB, format_table, max_peak
from resalign_fast.memplan.unets import MODELS

TARGETS_GIB = {"fd": 6.0, "exact": 12.0}  # LoRA configurations of pi(C)
WHOLE_TARGET_GIB = 12.0  # every configuration, full-parameter ones included
# the trainer's lean_full path (in-place simulation and fd HVPs for full-parameter configurations)
LEAN = Recipe(
    "fd/fused/ckpt/lean-full", hvp="fd", attention="fused", checkpointing=True, lean_full=True
)
# ... with the simulated optimizer's state in host memory (offload_optimizer_state)
LEAN_OFFLOAD = Recipe(
    "fd/fused/ckpt/lean-full/offload",
    hvp="fd",
    attention="fused",
    checkpointing=True,
    lean_full=True,
    offload_state=True,
)


def our_recipes(
    hvps=HVP_BACKENDS,
    attentions=tuple(ATTENTION),
    checkpointing=(False, True),
    weights: str = "fp32",
) -> list[Recipe]:
    """Every HVP backend x attention x checkpointing (DreamBooth terms split, base weights
    `weights`)."""
    return [
        Recipe(
            f"{h}/{a}/{'ckpt' if c else 'no-ckpt'}",
            hvp=h,
            attention=a,
            checkpointing=c,
            weights=weights,
        )
        for h in hvps
        for a in attentions
        for c in checkpointing
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see `main`)."""
    p = argparse.ArgumentParser(
        prog="python -m resalign_fast.memory", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--model", default="sd-v1-4", choices=sorted(MODELS), help="built-in UNet config"
    )
    p.add_argument("--resolution", type=int, default=512, help="image side in pixels")
    p.add_argument("--batch", type=int, default=1, help="images per forward pass")
    p.add_argument("--iters", type=int, default=5, help="Richardson iterations K")
    p.add_argument(
        "--sim_steps", "--sim-steps", type=int, default=1, help="simulated fine-tuning steps"
    )
    p.add_argument(
        "--weights",
        default="fp32",
        choices=("fp32", "bf16", "fp16"),
        help="dtype of our recipes' frozen base weights",
    )
    p.add_argument(
        "--target",
        default="cuda",
        choices=("cuda", "cpu"),
        help="device whose fused attention is modelled",
    )
    p.add_argument("--block", type=int, default=512, help="allocation rounding in bytes")
    p.add_argument(
        "--hvp",
        default=",".join(HVP_BACKENDS),
        help=f"comma list of HVP backends ({', '.join(HVP_BACKENDS)})",
    )
    p.add_argument(
        "--attention",
        default=",".join(ATTENTION),
        help=f"comma list of attention modes ({', '.join(ATTENTION)})",
    )
    p.add_argument("--checkpointing", default="off,on", help="comma list of off, on")
    p.add_argument(
        "--configs",
        default="all",
        help=f"comma list of configurations ({', '.join(c.name for c in PI_C)}) or all",
    )
    p.add_argument(
        "--guard",
        default=None,
        choices=("stable", "reference"),
        help="one guard for every recipe (default: each recipe's own)",
    )
    p.add_argument(
        "--no_reference", "--no-reference", action="store_true", help="skip the reference recipe"
    )
    p.add_argument("--no_lean", "--no-lean", action="store_true", help="skip the lean_full rows")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return p.parse_args(argv)


def _split(text: str, allowed, what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise SystemExit(f"error: --{what}: {bad or text!r} not in {list(allowed)}")
    return items


def select(args: argparse.Namespace) -> tuple[list[Recipe], tuple[ConfigKind, ...]]:
    """Recipes and configurations chosen by the flags."""
    ckpt = [s == "on" for s in _split(args.checkpointing, ("off", "on"), "checkpointing")]
    recipes = our_recipes(
        _split(args.hvp, HVP_BACKENDS, "hvp"),
        _split(args.attention, tuple(ATTENTION), "attention"),
        ckpt,
        args.weights,
    )
    if not args.no_reference:
        recipes.insert(0, REFERENCE)
    if not args.no_lean:
        recipes += [
            r if args.weights == "fp32" else replace(r, weights=args.weights)
            for r in (LEAN, LEAN_OFFLOAD)
        ]
    names = [c.name for c in PI_C]
    configs = (
        PI_C
        if args.configs == "all"
        else tuple(c for n in _split(args.configs, names, "configs") for c in PI_C if c.name == n)
    )
    return recipes, configs


def run(args: argparse.Namespace) -> dict:
    """Trace every recipe x configuration; the result as a JSON-ready dict."""
    if (
        args.resolution <= 0
        or args.batch <= 0
        or args.iters < 1
        or args.sim_steps < 1
        or args.block < 1
    ):
        raise SystemExit(
            "error: --resolution, --batch, --iters, --sim_steps and --block must be positive"
        )
    recipes, configs = select(args)
    shape = StepShape(
        batch=args.batch, resolution=args.resolution, iters=args.iters, sim_steps=args.sim_steps
    )
    try:
        MODELS[args.model].latent_shape(args.batch, args.resolution)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    est = Estimator(args.model, shape, block=args.block, target=args.target, guard=args.guard)
    t0 = time.perf_counter()
    rows = []
    for r in recipes:
        peaks = est.run_all(r, configs)
        rows.append({"recipe": asdict(r), "configs": [asdict(p) for p in peaks]})
    out = {
        "model": args.model,
        "resolution": args.resolution,
        "batch": args.batch,
        "iters": args.iters,
        "guard": args.guard,
        "target": args.target,
        "block": args.block,
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out["summary"] = summarize(rows, complete=len(configs) == len(PI_C))
    return out


def summarize(rows: list[dict], complete: bool = True) -> dict:
    """Reference vs the paper's 56 GB, and the best recipe of each HVP backend vs the issue's
    targets.

    complete: every configuration of pi(C) was traced. Otherwise the conclusions about the whole of
    pi(C) (the paper's ratio, "all configurations") are left out: only what was traced is reported.
    """
    s: dict = {"complete": complete}
    ref = next((r for r in rows if r["recipe"]["name"] == REFERENCE.name), None)
    if ref is not None and max_peak(ref["configs"]) is not None and not complete:
        s["reference"] = {
            "max_bytes": max_peak(ref["configs"]),
            "max_lora_bytes": max_peak(ref["configs"], "lora"),
        }
    elif ref is not None and max_peak(ref["configs"]) is not None:
        m = max_peak(ref["configs"])
        s["reference"] = {
            "max_bytes": m,
            "max_lora_bytes": max_peak(ref["configs"], "lora"),
            "paper_gb": PAPER_PEAK_GB,
            "ratio_to_paper": round(m / (PAPER_PEAK_GB * 1e9), 3),
        }
    ours = [r for r in rows if r["recipe"]["name"] != REFERENCE.name]
    for hvp in HVP_BACKENDS:
        cand = [
            (max_peak(r["configs"], "lora"), r["recipe"]["name"])
            for r in ours
            if r["recipe"]["hvp"] == hvp
        ]
        cand = [c for c in cand if c[0] is not None]
        if cand:
            v, name = min(cand)
            t = TARGETS_GIB.get(hvp)
            s[f"best_lora_{hvp}"] = {
                "recipe": name,
                "bytes": v,
                "target_gib": t,
                "meets": None if t is None or not complete else v <= t * GIB,
            }
    whole = [(max_peak(r["configs"]), r["recipe"]["name"]) for r in ours]
    whole = [w for w in whole if w[0] is not None]
    if whole and complete:
        v, name = min(whole)
        s["best_whole"] = {
            "recipe": name,
            "bytes": v,
            "target_gib": WHOLE_TARGET_GIB,
            "meets": v <= WHOLE_TARGET_GIB * GIB,
        }
    return s


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m resalign_fast.memory`; returns the exit status."""
    args = parse_args(argv)
    out = run(args)
    print(json.dumps(out, indent=1) if args.json else format_table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
