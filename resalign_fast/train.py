"""ResAlign unlearning: `python -m resalign_fast.train [--config run.toml] [--flag value ...]`.

Writes outputs/<run>/: model/ (a full diffusers model folder for finetune/evaluate; the unlearned
UNet is model/unet/, safetensors), lora/ (theta's adapter, LoRA theta), config.toml (resolved),
metrics.jsonl (one line per outer step), samples_before.png / samples_after.png, and checkpoints/
for `--resume`. Bad input exits non-zero with one message; nothing already written is lost.
model/ and lora/ appear complete or not at all (written to a temporary folder, then renamed), and
only after the merged UNet passed a health check (finite weights, finite output on a probe batch).

Exit status: 0 done; 2 bad input (nothing written, or the run folder left as it was); 3 numerical
failure: a NaN/inf with --nan_policy abort, more than MAX_SKIPPED_FRACTION of the outer steps
skipped, or an unlearned model whose weights or outputs are non-finite or exploding. Exit 3
exports nothing; the checkpoints stay for inspection or --resume.

Examples:
    python -m resalign_fast.train                                   # the digits world: erase 7
    python -m resalign_fast.train --concept 3 --outer_steps 10 --run_name quick
    python -m resalign_fast.train --run_name quick --resume         # continue a killed run

    torchrun --standalone --nproc_per_node N -m resalign_fast.train ...   spreads the k
    configurations
of each outer step over N processes (distributed.py); the result equals a one-process run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from resalign_fast.cli import parse_config
from resalign_fast.config import ConfigError, ResAlignConfig, to_toml
from resalign_fast.distributed import DistContext
from resalign_fast.export import export_run
from resalign_fast.runs import (
    ModelDiverged,
    RunError,
    check_resume_config,
    checkpoint_load,
    checkpoint_read,
    checkpoint_save,
    exit_status,
    folder_contents,
    load_data,
    lock_folder,
    pick_device,
    sample_grid,
    truncate_metrics,
    write_atomic,
)
from resalign_fast.threads import set_threads

log = logging.getLogger("resalign_fast.train")
# a skipped step leaves theta unchanged: a run that skipped most of its steps did under half of its
# unlearning schedule, and whatever made the steps fail (lr, data) is the thing to fix; an
# occasional
# skipped step (one of three in tests/test_bad_input.py) still ends the run normally
MAX_SKIPPED_FRACTION = 0.5


class RunFailed(RuntimeError):
    """The run went through its steps but its result is not usable (exit 3); the message says
    why."""


def check_ft_space(space, source: str) -> None:
    """Every pi(C) configuration's numbers have their field's type (`steps = 2.5` and `lr = true`
    are errors naming the file and key, not a traceback mid-run); floats are finite.

    Raises:
        ConfigError: the first bad value.
    """
    import math
    from dataclasses import fields

    for c in space.configs:
        for f in fields(c):
            v, t = getattr(c, f.name), (f.type if isinstance(f.type, str) else f.type.__name__)
            ok = {
                "int": isinstance(v, int) and not isinstance(v, bool),
                "float": isinstance(v, (int, float))
                and not isinstance(v, bool)
                and math.isfinite(v),
                "str": isinstance(v, str),
            }.get(t, True)
            if not ok:
                raise ConfigError(
                    f"{source}: {f.name} = {v!r} is not {'a finite ' if t == 'float' else 'an '}{t}"
                )


def run(cfg: ResAlignConfig, dist: DistContext | None = None) -> Path:
    """Run ResAlign end to end; returns the run folder.

    Everything that can fail on bad input (config, pi(C), model, data) is checked before the run
    folder is touched. With a process group (torchrun), every rank trains a replica of theta on its
    share of the configurations; rank 0 alone writes files.
    """
    from resalign_fast.bilevel import ResAlign
    from resalign_fast.inner.configs import load_ft_space
    from resalign_fast.models.pipeline import load_model

    dist = dist or DistContext()
    set_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.output_dir) / (cfg.run_name or f"resalign-{cfg.concept}-s{cfg.seed}")
    ckpt_dir = out / "checkpoints"
    if folder_contents(out) and not cfg.resume:
        raise RunError(
            f"{out} exists and is not empty: pass --resume to continue it, or another --run_name"
        )
    state = None
    if cfg.resume:
        check_resume_config(out, cfg)
        state = checkpoint_read(
            ckpt_dir
        )  # a damaged checkpoint is an error before anything is written
    ft_space = load_ft_space(cfg.ft_space)
    check_ft_space(ft_space, cfg.ft_space)
    model = load_model(
        cfg.pretrained_model_name_or_path,
        device=device,
        frozen_dtype=cfg.frozen_dtype,
        allow_pickle=cfg.allow_pickle,
        single_file_config=cfg.single_file_config or None,
    )
    if not dist.is_main:
        dist.barrier()  # rank 0 encodes first and fills the cache; the others read it
    data = load_data(cfg, model, device)
    lock = None
    if dist.is_main:
        dist.barrier()
        lock = lock_folder(out)  # held to the end: a second run into this folder fails at once
        if folder_contents(out) and not cfg.resume:  # another run got here first
            raise RunError(
                f"{out} exists and is not empty: pass --resume to continue it, or another "
                f"--run_name"
            )
        if not (out / "config.toml").is_file():  # a resumed run keeps its record
            write_atomic(out / "config.toml", to_toml(cfg))
    uncond = model.encode_prompts([""]).to(device).float()
    harm_prompts, benign_prompts = data.pop("_sample_prompts")
    if dist.is_main and cfg.samples_per_prompt and not (out / "samples_before.png").exists():
        sample_grid(cfg, model, harm_prompts, benign_prompts, out / "samples_before.png")
    torch.manual_seed(
        cfg.seed
    )  # theta's initial value must not depend on what ran before (rank 0 samples)
    algo = ResAlign(cfg, model, data, ft_space, uncond_emb=uncond, dist=dist)
    start = 0
    if cfg.resume:
        start = checkpoint_load(ckpt_dir, algo, state)
        if dist.is_main:
            truncate_metrics(out / "metrics.jsonl", start)
        log.info("resumed at outer step %d", start)
    bar = _progress(cfg, start) if dist.is_main else None
    with open(out / "metrics.jsonl", "a") if dist.is_main else contextlib.nullcontext() as metrics:
        for s in range(start, cfg.outer_steps):
            r = algo.step(s)
            if dist.is_main:
                metrics.write(json.dumps(asdict(r)) + "\n")
                metrics.flush()
                if (s + 1) % cfg.checkpoint_every == 0 or s + 1 == cfg.outer_steps:
                    checkpoint_save(ckpt_dir, algo, s + 1)
                _report_step(bar, cfg, r)
    if bar is not None:
        bar.close()
    if dist.is_main:
        totals = step_totals(out / "metrics.jsonl")
        if totals["steps"] and totals["skipped"] > MAX_SKIPPED_FRACTION * totals["steps"]:
            raise RunFailed(
                f"{totals['skipped']} of {totals['steps']} outer steps were skipped (non-finite "
                f"loss or "
                f"hypergradient; limit {MAX_SKIPPED_FRACTION:.0%}): nothing exported. Lower --lr, "
                f"or "
                f"look at {out / 'metrics.jsonl'}"
            )
        try:
            export_run(out, cfg, model, algo)
        except ModelDiverged as e:
            raise RunFailed(f"{e}. Lower --lr (now {cfg.lr:g})") from None
        if cfg.samples_per_prompt:
            sample_grid(
                cfg, model, harm_prompts, benign_prompts, out / "samples_after.png", unet=model.unet
            )
        _summary(cfg, out, totals)
    dist.barrier()
    if lock is not None:
        lock.close()
    return out


def step_totals(metrics: Path) -> dict:
    """Sums over metrics.jsonl (resumed steps included): steps, skipped, retries, fallbacks, hvps,
    solver_failures, and the first and last finite harmful loss."""
    rows = (
        [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        if metrics.is_file()
        else []
    )
    tot = {"steps": len(rows), "skipped": sum(bool(r.get("skipped")) for r in rows)}
    for k in ("retries", "fallbacks", "hvps", "solver_failures"):
        tot[k] = sum(int(r.get(k) or 0) for r in rows)
    harm = [
        r["harmful"]
        for r in rows
        if not r.get("skipped") and isinstance(r.get("harmful"), (int, float))
    ]
    tot["harmful_first"], tot["harmful_last"] = (harm[0], harm[-1]) if harm else (None, None)
    return tot


def _report_step(bar, cfg: ResAlignConfig, r) -> None:
    """At most one line per outer step: the progress bar's postfix, or one log line without a
    bar."""
    fields = dict(
        harm=f"{r.harmful:.3f}",
        pres=f"{r.preserve:.4f}",
        g=f"{r.hypergrad_norm:.3f}",
        retries=r.retries,
        fb=r.fallbacks,
    )
    fails = getattr(r, "solver_failures", 0)
    if fails:
        fields["solver_fail"] = fails
    if r.skipped:
        fields["skipped"] = 1
    if bar is not None:
        bar.update(1)
        bar.set_postfix(**fields)
    else:
        log.info(
            "outer step %d/%d: %s",
            r.step + 1,
            cfg.outer_steps,
            " ".join(f"{k} {v}" for k, v in fields.items()),
        )


def _summary(cfg: ResAlignConfig, out: Path, t: dict) -> None:
    """The end-of-run summary on stderr: what was erased, the guard's totals, the files, the next
    command."""
    what = f"digit {cfg.concept}" if not cfg.harmful_data else f"the concept of {cfg.harmful_data}"
    harm = ""
    if t["harmful_first"] is not None:
        harm = (
            f"; harmful loss {t['harmful_first']:.4g} -> {t['harmful_last']:.4g} "
            "(the harmful rate needs `evaluate`)"
        )
    guard = f"retries {t['retries']}, fallbacks {t['fallbacks']}"
    if t["hvps"]:
        guard += f", HVPs {t['hvps']}"
    if t["solver_failures"]:
        guard += f", solver failures {t['solver_failures']}"
    files = ["model/ (diffusers; model/unet/ is the unlearned UNet)"] + (
        ["lora/ (theta's adapter)"] if cfg.theta == "lora" else []
    )
    files += ["metrics.jsonl", "config.toml", "checkpoints/"]
    if cfg.samples_per_prompt:
        files += ["samples_before.png", "samples_after.png"]
    lines = [
        f"summary: erased {what} in {t['steps']} outer steps ({t['skipped']} skipped){harm}",
        f"  hypergradient guard: {guard} in total (per step: metrics.jsonl)",
        f"  files in {out}: " + ", ".join(files),
        f"  next: python -m resalign_fast.evaluate --model {out / 'model'}",
    ]
    print("\n".join(lines), file=sys.stderr)


def _progress(cfg: ResAlignConfig, start: int):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(
        total=cfg.outer_steps,
        initial=start,
        desc="ResAlign outer steps",
        unit="step",
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point; exit status 0 done, 2 bad input (one message on stderr), 3 numerical failure
    (nan_policy abort, too many skipped steps, a broken unlearned model: nothing exported)."""
    from resalign_fast import distributed
    from resalign_fast.bilevel import NumericalError
    from resalign_fast.models.pipeline import ModelError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def body() -> Path | None:
        cfg = parse_config(argv, description=__doc__, prog="python -m resalign_fast.train")
        dist = distributed.setup(cfg.device)
        if not dist.is_main:
            logging.getLogger().setLevel(logging.WARNING)
        try:
            out = run(cfg, dist)
        except NumericalError as e:
            raise RunFailed(
                f"{e}; the last checkpoint (if any) holds finite weights: fix the "
                "cause and --resume"
            ) from None
        return out if dist.is_main else None  # one "done:" line, from rank 0

    try:
        return exit_status(
            body,
            (ConfigError, RunError, ModelError, ValueError, FileNotFoundError),
            numerical=(RunFailed,),
        )
    finally:
        distributed.teardown()


if __name__ == "__main__":
    sys.exit(main())
