"""Loading a Stable Diffusion single-file checkpoint (.safetensors) offline."""

from __future__ import annotations

from pathlib import Path

from resalign_fast.models.pipeline import DiffusionModel, ModelError, eager_attention


def load_single_file(path: Path, allow_pickle: bool, config: str | None) -> DiffusionModel:
    """A Stable Diffusion single-file checkpoint through diffusers' single-file loader (offline)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    if path.suffix not in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        raise ModelError(
            f"{path}: not a model file (expected a .safetensors single-file checkpoint or a "
            f"diffusers folder)"
        )
    if path.suffix != ".safetensors" and not allow_pickle:
        raise ModelError(
            f"{path}: pickled checkpoint; convert it to .safetensors or pass --allow_pickle "
            f"(loaded with torch.load(weights_only=True))"
        )
    kw = {"config": str(config)} if config else {}
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path),
            local_files_only=True,
            safety_checker=None,
            requires_safety_checker=False,
            **kw,
        )
    except Exception as e:  # diffusers raises many kinds here; one clear message
        hint = (
            ""
            if config
            else (
                " Offline, diffusers needs the component configs locally: pass "
                "--single_file_config "
                "<a local diffusers folder of the same architecture>, or convert the file to a "
                "folder."
            )
        )
        raise ModelError(
            f"{path}: could not load as a single-file Stable Diffusion checkpoint offline: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}.{hint}"
        ) from None
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    eager_attention(pipe.text_encoder)
    return DiffusionModel(
        pipe.unet,
        pipe.text_encoder.requires_grad_(False).eval(),
        pipe.tokenizer,
        sched,
        pipe.vae.requires_grad_(False).eval(),
        source=str(path),
        scheduler_class=type(pipe.scheduler).__name__,
    )
