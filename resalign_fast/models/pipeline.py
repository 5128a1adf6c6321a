"""Text-to-image models as one bundle: build the digits model, load a local diffusers folder, save.

A model folder is a diffusers pipeline folder: `unet/`, `text_encoder/`, `tokenizer/`,
`scheduler/` and, for latent models such as Stable Diffusion, `vae/`. Without `vae/` the model works
in pixel space (the embedded digits model). Nothing is ever downloaded.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger("resalign_fast.models")

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DIGITS_MODEL_DIR = ASSETS / "digits_base"
DEFAULT_MODEL = "digits"

# The digits model: 16x16 greyscale, 1.66M UNet parameters, attention at 8x8 and 4x4.
DIGITS_UNET_CONFIG = dict(
    sample_size=16, in_channels=1, out_channels=1, layers_per_block=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
)
DIGITS_TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=16, projection_dim=32,
)
DIGITS_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")


class ModelError(ValueError):
    """A model path that cannot be used; the message says what to pass instead."""


@dataclass
class DiffusionModel:
    """The parts of a text-to-image diffusion model that the method touches.

    Attributes:
        unet: diffusers UNet2DConditionModel (trainable part).
        text_encoder: transformers CLIPTextModel (frozen).
        tokenizer: transformers CLIPTokenizer.
        scheduler: diffusers DDPMScheduler (training noise schedule).
        vae: diffusers AutoencoderKL or None for a pixel-space model.
        source: where it came from (path or "digits").
    """

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    vae: Optional[torch.nn.Module] = None
    source: str = ""
    _emb_cache: dict = field(default_factory=dict, repr=False)

    @property
    def resolution(self) -> int:
        """Image resolution in pixels."""
        s = int(self.unet.config.sample_size)
        return s * self.vae_scale if self.vae is not None else s

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    @property
    def image_channels(self) -> int:
        return 3 if self.vae is not None else int(self.unet.config.in_channels)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings (N, L, D), cached per prompt (the text encoder is frozen)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._emb_cache]
        if missing:
            tok = self.tokenizer(missing, padding="max_length", truncation=True,
                                 max_length=self.tokenizer.model_max_length, return_tensors="pt")
            dev = next(self.text_encoder.parameters()).device
            emb = self.text_encoder(tok.input_ids.to(dev))[0]
            for p, e in zip(missing, emb):
                self._emb_cache[p] = e
        return torch.stack([self._emb_cache[p] for p in prompts])

    @torch.no_grad()
    def to_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) in [-1, 1] -> the UNet's input space (identity in pixel space)."""
        if self.vae is None:
            return images
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return (dist.mean * self.vae.config.scaling_factor).float()

    @torch.no_grad()
    def to_images(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of `to_latents`, clamped to [-1, 1]."""
        if self.vae is not None:
            latents = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample.float()
        return latents.clamp(-1, 1)

    def to(self, device: torch.device | str) -> "DiffusionModel":
        for m in (self.unet, self.text_encoder, self.vae):
            if m is not None:
                m.to(device)
        self._emb_cache.clear()
        return self


def build_digits_model(seed: int = 0) -> DiffusionModel:
    """A freshly initialised digits model (random weights, seeded)."""
    import tempfile

    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from resalign_fast.models.tokenizer import build_clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**DIGITS_UNET_CONFIG)
    text = CLIPTextModel(CLIPTextConfig(**DIGITS_TEXT_CONFIG))
    with tempfile.TemporaryDirectory() as d:
        tok = build_clip_tokenizer(d, model_max_length=DIGITS_TEXT_CONFIG["max_position_embeddings"])
    return DiffusionModel(unet, text.eval().requires_grad_(False), tok, DDPMScheduler(**DIGITS_SCHEDULER_CONFIG), source="init")


def load_model(path: str | Path = DEFAULT_MODEL, *, device: str | torch.device = "cpu") -> DiffusionModel:
    """Load a local model: "digits" (the embedded default), a diffusers folder or a single .safetensors file.

    Raises:
        ModelError: a path that does not exist, a hub id (downloads are never attempted), or a
            folder that is not a diffusers pipeline folder.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if str(path) == DEFAULT_MODEL:
        path = DIGITS_MODEL_DIR
        if not (path / "unet").is_dir():
            raise ModelError(f"embedded digits model missing at {path}: run `python -m resalign_fast.pretrain_digits`")
    p = Path(path)
    if p.is_file() and p.suffix in (".safetensors", ".ckpt"):
        return _load_single_file(p, device)
    if not p.exists():
        hint = " (looks like a hub id: downloads are never attempted)" if "/" in str(path) and not str(path).startswith((".", "/")) else ""
        raise ModelError(f"{path}: no such model folder or file{hint}. Pass a local diffusers folder "
                         f"(e.g. one saved by StableDiffusionPipeline.save_pretrained) or a single .safetensors file.")
    for sub in ("unet", "text_encoder", "tokenizer", "scheduler"):
        if not (p / sub).is_dir():
            raise ModelError(f"{p}: not a diffusers pipeline folder (missing {sub}/)")
    kw = dict(local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(p, subfolder="unet", **kw)
    text = CLIPTextModel.from_pretrained(p / "text_encoder", **kw)
    _eager_attention(text)
    tok = CLIPTokenizer.from_pretrained(p / "tokenizer", **kw)
    sched = DDPMScheduler.from_pretrained(p, subfolder="scheduler", **kw)
    vae = AutoencoderKL.from_pretrained(p, subfolder="vae", **kw).requires_grad_(False).eval() if (p / "vae").is_dir() else None
    m = DiffusionModel(unet, text.requires_grad_(False).eval(), tok, sched, vae, source=str(p))
    return m.to(device)


def _eager_attention(text_encoder: torch.nn.Module) -> None:
    """CLIP text models must use eager attention for double backward (FACTS.md)."""
    text_encoder.config._attn_implementation = "eager"


def _load_single_file(path: Path, device) -> DiffusionModel:
    """A Stable Diffusion single-file checkpoint through diffusers' single-file loader (offline)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    if path.suffix == ".ckpt":
        raise ModelError(f"{path}: pickled checkpoints are not loaded; convert to .safetensors")
    try:
        pipe = StableDiffusionPipeline.from_single_file(str(path), local_files_only=True, safety_checker=None)
    except Exception as e:  # diffusers raises many kinds here; one clear message
        raise ModelError(f"{path}: could not load as a single-file Stable Diffusion checkpoint offline: {e}") from e
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    _eager_attention(pipe.text_encoder)
    return DiffusionModel(pipe.unet, pipe.text_encoder.requires_grad_(False).eval(), pipe.tokenizer, sched,
                          pipe.vae.requires_grad_(False).eval(), source=str(path)).to(device)


def save_model(model: DiffusionModel, out_dir: str | Path, *, unet: Optional[torch.nn.Module] = None,
               extra: Optional[dict] = None) -> Path:
    """Save as a diffusers pipeline folder (safetensors). `unet` overrides model.unet (e.g. a merged one)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (unet or model.unet).save_pretrained(out / "unet", safe_serialization=True)
    model.text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    model.tokenizer.save_pretrained(out / "tokenizer")
    model.scheduler.save_pretrained(out / "scheduler")
    if model.vae is not None:
        model.vae.save_pretrained(out / "vae", safe_serialization=True)
    index = {"_class_name": "StableDiffusionPipeline" if model.vae is not None else "ResAlignPixelPipeline",
             "_diffusers_version": __import__("diffusers").__version__}
    index.update(extra or {})
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out
