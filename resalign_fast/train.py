"""ResAlign unlearning: `python -m resalign_fast.train [--config run.toml] [--flag value ...]`.

Writes outputs/<run>/: unet/ (the unlearned UNet, diffusers format, safetensors), a full model
folder model/ (for finetune/evaluate), lora/ (theta's adapter), config.toml (resolved),
metrics.jsonl (one line per outer step), samples_before.png / samples_after.png, and checkpoints/
for `--resume`. Bad input exits non-zero with one message; nothing already written is lost.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from resalign_fast.config import ConfigError, ResAlignConfig, parse_config, to_toml
from resalign_fast.runs import (RunError, checkpoint_load, checkpoint_save, export_run, load_data, pick_device,
                                sample_grid, truncate_metrics)

log = logging.getLogger("resalign_fast.train")


def run(cfg: ResAlignConfig) -> Path:
    """Run ResAlign end to end; returns the run folder."""
    from resalign_fast.bilevel import ResAlign
    from resalign_fast.inner.configs import load_ft_space
    from resalign_fast.models.pipeline import load_model

    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.output_dir) / (cfg.run_name or f"resalign-{cfg.concept}-s{cfg.seed}")
    ckpt_dir = out / "checkpoints"
    if out.exists() and any(out.iterdir()) and not cfg.resume:
        raise RunError(f"{out} exists and is not empty: pass --resume to continue it, or another --run_name")
    out.mkdir(parents=True, exist_ok=True)
    ft_space = load_ft_space(cfg.ft_space)
    (out / "config.toml").write_text(to_toml(cfg))
    model = load_model(cfg.pretrained_model_name_or_path, device=device)
    data = load_data(cfg, model, device)
    uncond = model.encode_prompts([""]).to(device)
    harm_prompts, benign_prompts = data.pop("_sample_prompts")
    if cfg.samples_per_prompt and not (out / "samples_before.png").exists():
        sample_grid(cfg, model, harm_prompts, benign_prompts, out / "samples_before.png")
    algo = ResAlign(cfg, model, data, ft_space, uncond)
    start = 0
    if cfg.resume:
        start = checkpoint_load(ckpt_dir, algo)
        truncate_metrics(out / "metrics.jsonl", start)
        log.info("resumed at outer step %d", start)
    bar = _progress(cfg, start)
    with open(out / "metrics.jsonl", "a") as metrics:
        for s in range(start, cfg.outer_steps):
            r = algo.step(s)
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
    export_run(out, cfg, model, algo)
    if cfg.samples_per_prompt:
        sample_grid(cfg, model, harm_prompts, benign_prompts, out / "samples_after.png", unet=model.unet)
    return out


def _progress(cfg: ResAlignConfig, start: int):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.outer_steps, initial=start, desc="ResAlign outer steps", unit="step", file=sys.stderr)


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = parse_config(argv, description=__doc__)
        out = run(cfg)
    except (ConfigError, RunError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
