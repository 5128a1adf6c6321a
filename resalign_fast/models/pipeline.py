"""Text-to-image models as one bundle: build the digits model, load a local diffusers folder, save.

A model folder is a diffusers pipeline folder: `unet/`, `text_encoder/`, `tokenizer/`,
`scheduler/` and, for latent models such as Stable Diffusion, `vae/`. Without `vae/` the model works
in pixel space (the embedded digits model). Nothing is ever downloaded. Weights are read from
safetensors only unless `allow_pickle=True` (then diffusers/transformers read `.bin`/`.ckpt` files,
with `torch.load(weights_only=True)`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger("resalign_fast.models")

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DIGITS_MODEL_DIR = ASSETS / "digits_base"
DEFAULT_MODEL = "digits"

# The digits model: 16x16 greyscale, 1.66M UNet parameters, attention at 8x8 and 4x4.
DIGITS_UNET_CONFIG = dict(
    sample_size=16,
    in_channels=1,
    out_channels=1,
    layers_per_block=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
)
DIGITS_TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=16,
    projection_dim=32,
)
DIGITS_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon"
)
FROZEN_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
        frozen_dtype: dtype of the frozen parts (VAE, text encoder, a frozen copy of the UNet).
        fingerprint: identifies the weights and frozen_dtype (keys the encoded-data cache).
        scheduler_class: the source's sampling scheduler class (kept on export).
    """

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    vae: torch.nn.Module | None = None
    source: str = ""
    frozen_dtype: torch.dtype = torch.float32
    fingerprint: str = ""
    scheduler_class: str = "DDPMScheduler"
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
            tok = self.tokenizer(
                missing,
                padding="max_length",
                truncation=True,
                max_length=self.tokenizer.model_max_length,
                return_tensors="pt",
            )
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
            latents = self.vae.decode(
                latents.to(self.vae.dtype) / self.vae.config.scaling_factor
            ).sample.float()
        return latents.clamp(-1, 1)

    def to(self, device: torch.device | str) -> DiffusionModel:
        for m in (self.unet, self.text_encoder, self.vae):
            if m is not None:
                m.to(device)
        self._emb_cache.clear()
        return self


def build_digits_model(
    seed: int = 0, unet_config: dict | None = None, text_config: dict | None = None
) -> DiffusionModel:
    """A freshly initialised digits model (random weights, seeded); configs override the defaults
    (tests use tiny ones)."""
    import tempfile

    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from resalign_fast.models.tokenizer import build_clip_tokenizer

    torch.manual_seed(seed)
    tcfg = dict(DIGITS_TEXT_CONFIG, **(text_config or {}))
    unet = UNet2DConditionModel(**dict(DIGITS_UNET_CONFIG, **(unet_config or {})))
    text = CLIPTextModel(CLIPTextConfig(**tcfg))
    eager_attention(text)
    with tempfile.TemporaryDirectory() as d:
        tok = build_clip_tokenizer(d, model_max_length=tcfg["max_position_embeddings"])
    return DiffusionModel(
        unet,
        text.eval().requires_grad_(False),
        tok,
        DDPMScheduler(**DIGITS_SCHEDULER_CONFIG),
        source="init",
    )


def load_model(
    path: str | Path = DEFAULT_MODEL,
    *,
    device: str | torch.device = "cpu",
    frozen_dtype: str = "fp32",
    allow_pickle: bool = False,
    single_file_config: str | None = None,
) -> DiffusionModel:
    """Load a local model: "digits" (the embedded default), a diffusers folder or a single
    .safetensors file.

    Args:
        frozen_dtype: "fp32", "bf16" or "fp16" for the frozen VAE and text encoder (a memory saver
            on GPU; the trainable UNet stays in its dtype).
        allow_pickle: also read pickled weights (.bin/.ckpt), with torch.load(weights_only=True).
        single_file_config: a local diffusers folder whose component configs describe a single-file
            checkpoint (diffusers otherwise looks them up on the hub, which offline fails).

    Raises:
        ModelError: a path that does not exist, a hub id (downloads are never attempted), a folder
            that is not a diffusers pipeline folder, or weights that cannot be read.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if frozen_dtype not in FROZEN_DTYPES:
        raise ModelError(f"frozen_dtype: {frozen_dtype!r} is not one of {sorted(FROZEN_DTYPES)}")
    if str(path) == DEFAULT_MODEL:
        path = DIGITS_MODEL_DIR
        if not (path / "unet").is_dir():
            raise ModelError(
                f"embedded digits model missing at {path}: run `python -m "
                f"resalign_fast.pretrain_digits`"
            )
    p = Path(path)
    if p.is_file():
        from resalign_fast.models.single_file import load_single_file

        m = load_single_file(p, allow_pickle, single_file_config)
    elif not p.exists():
        hint = (
            " (looks like a hub id: downloads are never attempted)"
            if "/" in str(path) and not str(path).startswith((".", "/", "~"))
            else ""
        )
        raise ModelError(
            f"{path}: no such model folder or file{hint}. Pass a local diffusers folder "
            f"(e.g. one saved by StableDiffusionPipeline.save_pretrained) or a single .safetensors "
            f"file."
        )
    else:
        for sub in ("unet", "text_encoder", "tokenizer", "scheduler"):
            if not (p / sub).is_dir():
                raise ModelError(f"{p}: not a diffusers pipeline folder (missing {sub}/)")
        kw = dict(local_files_only=True, use_safetensors=None if allow_pickle else True)
        try:
            unet = UNet2DConditionModel.from_pretrained(p, subfolder="unet", **kw)
            text = CLIPTextModel.from_pretrained(p / "text_encoder", **kw)
            tok = CLIPTokenizer.from_pretrained(p / "tokenizer", local_files_only=True)
            sched = DDPMScheduler.from_pretrained(p, subfolder="scheduler", local_files_only=True)
            vae = (
                AutoencoderKL.from_pretrained(p, subfolder="vae", **kw)
                if (p / "vae").is_dir()
                else None
            )
        except (OSError, ValueError) as e:
            hint = (
                ""
                if allow_pickle
                else " (only .safetensors weights are read; pickled .bin files need allow_pickle / "
                "--allow_pickle)"
            )
            raise ModelError(
                f"{p}: cannot load the model{hint}: {str(e).splitlines()[0]}"
            ) from None
        eager_attention(text)
        cls = json.loads((p / "scheduler" / "scheduler_config.json").read_text()).get(
            "_class_name", "DDPMScheduler"
        )
        m = DiffusionModel(
            unet,
            text.requires_grad_(False).eval(),
            tok,
            sched,
            None if vae is None else vae.requires_grad_(False).eval(),
            source=str(p),
            scheduler_class=cls,
        )
    m.frozen_dtype = FROZEN_DTYPES[frozen_dtype]
    for part in (m.text_encoder, m.vae):
        if part is not None and m.frozen_dtype != torch.float32:
            part.to(m.frozen_dtype)
    m.fingerprint = _fingerprint(Path(m.source), frozen_dtype)
    return m.to(device)


def _fingerprint(src: Path, frozen_dtype: str) -> str:
    """Hash of (name, size, mtime) of every file of the model and the frozen dtype: a changed
    model misses the cache."""
    h = hashlib.sha256(f"{src.resolve()}|{frozen_dtype}".encode())
    files = (
        sorted(q for q in src.rglob("*") if q.is_file())
        if src.is_dir()
        else [src]
        if src.is_file()
        else []
    )
    for q in files:
        st = q.stat()
        name = q.relative_to(src) if src.is_dir() else q.name
        h.update(f"{name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def eager_attention(text_encoder: torch.nn.Module) -> None:
    """CLIP text models must use eager attention for double backward (FACTS.md)."""
    text_encoder.config._attn_implementation = "eager"


def save_model(
    model: DiffusionModel,
    out_dir: str | Path,
    *,
    unet: torch.nn.Module | None = None,
    extra: dict | None = None,
) -> Path:
    """Save as a diffusers pipeline folder (safetensors). `unet` overrides model.unet (e.g. a merged
    one).

    A latent model is saved through `StableDiffusionPipeline(...,
    safety_checker=None).save_pretrained`,
    so `StableDiffusionPipeline.from_pretrained(out_dir)` loads it; the sampling scheduler keeps the
    source's class. Frozen parts held in bf16/fp16 are copied from the source folder, not saved
    rounded. A pixel-space model gets the same layout and a diffusers-style model_index.json of
    class "ResAlignPixelPipeline" (load it with `load_model`). `extra` keys land in model_index.json
    with a leading underscore (ignored by diffusers).
    """
    import diffusers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unet = unet or model.unet
    sched_cls = getattr(diffusers, model.scheduler_class, None) or diffusers.DDPMScheduler
    extra = {(k if k.startswith("_") else f"_{k}"): v for k, v in (extra or {}).items()}
    if model.vae is not None:
        pipe = diffusers.StableDiffusionPipeline(
            vae=model.vae,
            text_encoder=model.text_encoder,
            tokenizer=model.tokenizer,
            unet=unet,
            scheduler=sched_cls.from_config(model.scheduler.config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(out, safe_serialization=True)
        src = Path(model.source)
        if model.frozen_dtype != torch.float32:
            for sub in ("vae", "text_encoder"):
                if not (src / sub).is_dir():
                    raise ModelError(
                        f"save_model: {sub} is held in {model.frozen_dtype} and {src} has no "
                        f"{sub}/ "
                        f"to copy; load with frozen_dtype='fp32' to export"
                    )
                shutil.rmtree(out / sub)
                shutil.copytree(src / sub, out / sub)
        if extra:
            index = json.loads((out / "model_index.json").read_text())
            (out / "model_index.json").write_text(
                json.dumps(dict(index, **extra), indent=2, sort_keys=True)
            )
        return out
    unet.save_pretrained(out / "unet", safe_serialization=True)
    model.text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    model.tokenizer.save_pretrained(out / "tokenizer")
    sched_cls.from_config(model.scheduler.config).save_pretrained(out / "scheduler")
    index = {
        "_class_name": "ResAlignPixelPipeline",
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", type(unet).__name__],
        "scheduler": ["diffusers", sched_cls.__name__],
        "text_encoder": ["transformers", type(model.text_encoder).__name__],
        "tokenizer": ["transformers", type(model.tokenizer).__name__],
    }
    index.update(extra)
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out
