"""Export of a finished run: the merged model (model/) and theta's adapter (lora/)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from resalign_fast.config import ResAlignConfig
from resalign_fast.runs import ModelDiverged, RunError, atomic_dir


def export_run(out: Path, cfg: ResAlignConfig, model, algo) -> None:
    """model/ (full diffusers folder with the merged UNet) and lora/ (theta's adapter, LoRA theta
    only).

    model/ loads with `StableDiffusionPipeline.from_pretrained` when the base is an SD pipeline;
    lora/ loads onto the base model with `pipe.load_lora_weights(out / "lora")`.

    Both are written into a temporary folder and renamed into place (`atomic_dir`): a kill during
    the export leaves no model/ (or the previous complete one), never a half-written one.

    Raises:
        RunError: theta holds NaN/inf, or the merged state dict does not fit; nothing is saved.
        ModelDiverged: the merged UNet's weights or probe output are non-finite or exploding
            (`models.health`); nothing is saved.
    """
    from resalign_fast.models.health import UnhealthyModel, check_unet
    from resalign_fast.models.pipeline import save_model

    if not all(torch.isfinite(p).all() for p in algo.theta):
        raise RunError(
            "theta holds NaN or inf: not exporting (the last good checkpoint is in checkpoints/)"
        )
    unet = model.unet
    lora = cfg.theta == "lora"
    try:
        plain = plain_unet(unet, algo.theta if lora else None, algo.space if lora else None)
    except ValueError as e:
        raise RunError(f"export: merged {e}") from None
    try:
        check_unet(plain, model)
    except UnhealthyModel as e:
        raise ModelDiverged(f"the unlearned model is broken: {e}; not exporting") from None
    with atomic_dir(out / "model") as tmp:
        save_model(model, tmp, unet=plain, extra={"resalign_fast_run": str(out.name)})
    if cfg.theta == "lora":
        with atomic_dir(out / "lora") as tmp:
            _save_lora(tmp, cfg, unet)


def plain_unet(unet: torch.nn.Module, values=None, space=None) -> torch.nn.Module:
    """A plain diffusers UNet (no adapter) on unet's device holding unet's weights, with the LoRA
    `values` of `space` (a `models.lora.ParamSpace`) merged in; values None: the weights as they
    are.

    Raises:
        ValueError: the merged state dict does not fit the plain UNet (keys named).
    """
    from diffusers import UNet2DConditionModel

    from resalign_fast.models.lora import merged_state_dict

    plain = UNet2DConditionModel.from_config(unet.config)
    sd = merged_state_dict(unet, values, space)
    missing, unexpected = plain.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"state dict mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return plain.to(next(unet.parameters()).device)


def _save_lora(folder: Path, cfg: ResAlignConfig, unet) -> None:
    """theta's adapter in diffusers' LoRA format (+ adapter_config.json) into `folder`."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    # the adapter's LoraConfig travels in the file's metadata, so that load_lora_weights applies
    # alpha/rank (without it diffusers assumes alpha = rank)
    meta = {
        k: v
        for k, v in unet.peft_config["default"].to_dict().items()
        if k in ("r", "lora_alpha", "target_modules")
    }
    meta["target_modules"] = (
        sorted(meta["target_modules"])
        if isinstance(meta["target_modules"], (set, list))
        else meta["target_modules"]
    )
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=layers, safe_serialization=True, unet_lora_adapter_metadata=meta
    )
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {"r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "placement": cfg.lora_placement},
            indent=2,
        )
    )
