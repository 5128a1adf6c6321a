"""ResAlign unlearning: `python -m resalign_fast.train [--config run.toml] [--flag value ...]`.

Writes outputs/<run>/: unet/ (the unlearned UNet, diffusers format, safetensors), a full model
folder model/ (for finetune/evaluate), lora/ (theta's adapter), config.toml (resolved),
metrics.jsonl (one line per outer step), samples_before.png / samples_after.png, and checkpoints/
for `--resume`. Bad input exits non-zero with one message; nothing already written is lost.

    torchrun --standalone --nproc_per_node N -m resalign_fast.train ...   spreads the k configurations
of each outer step over N processes (distributed.py); the result equals a one-process run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from resalign_fast.config import ConfigError, ResAlignConfig, parse_config, to_toml
from resalign_fast.distributed import DistContext
from resalign_fast.runs import (RunError, check_resume_config, checkpoint_load, checkpoint_read, checkpoint_save, export_run,
                                load_data, pick_device, sample_grid, truncate_metrics, write_atomic)

log = logging.getLogger("resalign_fast.train")


def run(cfg: ResAlignConfig, dist: Optional[DistContext] = None) -> Path:
    """Run ResAlign end to end; returns the run folder.

    Everything that can fail on bad input (config, pi(C), model, data) is checked before the run
    folder is touched. With a process group (torchrun), every rank trains a replica of theta on its
    share of the configurations; rank 0 alone writes files.
    """
    from resalign_fast.bilevel import ResAlign
    from resalign_fast.inner.configs import load_ft_space
    from resalign_fast.models.pipeline import load_model

    dist = dist or DistContext()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.output_dir) / (cfg.run_name or f"resalign-{cfg.concept}-s{cfg.seed}")
    ckpt_dir = out / "checkpoints"
    if out.exists() and any(out.iterdir()) and not cfg.resume:
        raise RunError(f"{out} exists and is not empty: pass --resume to continue it, or another --run_name")
    state = None
    if cfg.resume:
        check_resume_config(out, cfg)
        state = checkpoint_read(ckpt_dir)  # a damaged checkpoint is an error before anything is written
    ft_space = load_ft_space(cfg.ft_space)
    model = load_model(cfg.pretrained_model_name_or_path, device=device, frozen_dtype=cfg.frozen_dtype,
                       allow_pickle=cfg.allow_pickle, single_file_config=cfg.single_file_config or None)
    if not dist.is_main:
        dist.barrier()  # rank 0 encodes first and fills the cache; the others read it
    data = load_data(cfg, model, device)
    if dist.is_main:
        dist.barrier()
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "config.toml").is_file():  # a resumed run keeps its record
            write_atomic(out / "config.toml", to_toml(cfg))
    uncond = model.encode_prompts([""]).to(device).float()
    harm_prompts, benign_prompts = data.pop("_sample_prompts")
    if dist.is_main and cfg.samples_per_prompt and not (out / "samples_before.png").exists():
        sample_grid(cfg, model, harm_prompts, benign_prompts, out / "samples_before.png")
    torch.manual_seed(cfg.seed)  # theta's initial value must not depend on what ran before (rank 0 samples)
    algo = ResAlign(cfg, model, data, ft_space, uncond, dist=dist)
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
            if bar is not None:
                bar.update(1)
                bar.set_postfix(harm=f"{r.harmful:.3f}", pres=f"{r.preserve:.4f}", g=f"{r.hypergrad_norm:.3f}",
                                fb=r.fallbacks)
    if bar is not None:
        bar.close()
    if dist.is_main:
        export_run(out, cfg, model, algo)
        if cfg.samples_per_prompt:
            sample_grid(cfg, model, harm_prompts, benign_prompts, out / "samples_after.png", unet=model.unet)
    dist.barrier()
    return out


def _progress(cfg: ResAlignConfig, start: int):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.outer_steps, initial=start, desc="ResAlign outer steps", unit="step", file=sys.stderr)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point; exit status 0 done, 2 bad input (one message on stderr), 3 numerical failure."""
    from resalign_fast import distributed
    from resalign_fast.bilevel import NumericalError
    from resalign_fast.models.pipeline import ModelError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main_rank = True
    try:
        cfg = parse_config(argv, description=__doc__)
        dist = distributed.setup(cfg.device)
        main_rank = dist.is_main
        if not main_rank:
            logging.getLogger().setLevel(logging.WARNING)
        out = run(cfg, dist)
    except (ConfigError, RunError, ModelError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NumericalError as e:
        print(f"error: {e}; the last checkpoint (if any) holds finite weights: fix the cause and --resume", file=sys.stderr)
        return 3
    finally:
        distributed.teardown()
    if main_rank:
        print(f"done: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
