"""Prompt/image data sets: the in-memory form, and image folders with `metadata.csv`.

An image folder follows the diffusers imagefolder convention: image files plus a `metadata.csv`
with a `file_name` column and a caption column (`text`, `caption` or `prompt`).
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger("resalign_fast.data")

CAPTION_COLUMNS = ("text", "caption", "prompt")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
_CONVERTIBLE = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "La", "RGBa"}


class DataError(ValueError):
    """A data set that cannot be used as given; the message names the file."""


@dataclass
class PromptImageSet:
    """Images with one prompt each.

    Attributes:
        images: (N, C, H, W) float32 in [-1, 1].
        prompts: N captions.
        labels: optional (N,) int64 class labels (the digits world has them).
        skipped: files that were skipped while loading, with the reason.
    """

    images: torch.Tensor
    prompts: list[str]
    labels: torch.Tensor | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or len(self.prompts) != self.images.shape[0]:
            raise DataError(
                f"expected images (N, C, H, W) with N prompts, got {tuple(self.images.shape)} "
                f"and {len(self.prompts)} prompts"
            )
        if len(self.prompts) == 0:
            raise DataError("empty data set")

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, idx: torch.Tensor) -> PromptImageSet:
        """The items at integer indices `idx`."""
        return PromptImageSet(
            images=self.images[idx],
            prompts=[self.prompts[int(i)] for i in idx],
            labels=None if self.labels is None else self.labels[idx],
        )


def read_metadata(folder: Path) -> list[tuple[str, str]]:
    """Rows (file_name, caption) of `folder/metadata.csv`, with errors that name the file."""
    meta = folder / "metadata.csv"
    if not folder.is_dir():
        raise DataError(f"{folder}: not a directory")
    if not meta.is_file():
        raise DataError(
            f"{meta}: missing (an image folder needs metadata.csv with file_name and text columns)"
        )
    try:
        with open(meta, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            cols = reader.fieldnames or []
            if "file_name" not in cols:
                raise DataError(f"{meta}: no 'file_name' column (columns: {cols})")
            cap = next((c for c in CAPTION_COLUMNS if c in cols), None)
            if cap is None:
                raise DataError(
                    f"{meta}: no caption column, expected one of {CAPTION_COLUMNS} (columns: "
                    f"{cols})"
                )
            rows = []
            for row in reader:
                name, text = (row.get("file_name") or "").strip(), row.get(cap)
                if not name or text is None or None in row:  # None key: more fields than columns
                    raise DataError(f"{meta}:{reader.line_num}: malformed row {row}")
                rows.append((name, text.strip()))
    except UnicodeDecodeError as e:
        raise DataError(f"{meta}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise DataError(f"{meta}: malformed CSV: {e}") from None
    if not rows:
        raise DataError(f"{meta}: no rows")
    return rows


def load_image(path: Path, resolution: int, channels: int) -> torch.Tensor:
    """One image as (channels, resolution, resolution) float32 in [-1, 1].

    Converts the mode (RGBA, palette, greyscale, CMYK, 16-bit greyscale) to `channels` (alpha is
    dropped, as the diffusers scripts do) and resizes (shorter side to
    `resolution`, then a centre crop), as the diffusers training scripts do.
    """
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode in (
            "I;16",
            "I;16B",
            "I;16L",
            "I",
        ):  # 16-bit greyscale: scale to 8 bits (convert would clip)
            im = Image.fromarray(
                (np.asarray(im, dtype=np.float64) / 257.0).clip(0, 255).round().astype(np.uint8)
            )
        elif im.mode not in _CONVERTIBLE:
            raise ValueError(f"unsupported image mode {im.mode}")
        im = im.convert("L" if channels == 1 else "RGB")
        w, h = im.size
        s = resolution / min(w, h)
        im = im.resize(
            (max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC
        )
        w, h = im.size
        left, top = (w - resolution) // 2, (h - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
        data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    x = data.view(resolution, resolution, channels).permute(2, 0, 1).float() / 127.5 - 1.0
    return x.contiguous()


def load_image_folder(folder: str | Path, resolution: int, channels: int = 3) -> PromptImageSet:
    """Load an image folder with `metadata.csv`.

    Unreadable or corrupt images are skipped, counted in `skipped` and logged; a folder in which
    no image survives is an error.

    Raises:
        DataError: missing folder or metadata, malformed metadata, no usable image.
    """
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    rows = read_metadata(folder)
    images, prompts, skipped = [], [], []
    for name, text in rows:
        path = folder / name
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append((name, f"not an image suffix {sorted(IMAGE_SUFFIXES)}"))
            continue
        try:
            images.append(load_image(path, resolution, channels))
            prompts.append(text)
        except FileNotFoundError:
            skipped.append((name, "file not found"))
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            skipped.append((name, f"unreadable image: {e}"))
    for name, why in skipped:
        log.warning("%s: skipped %s (%s)", folder, name, why)
    if skipped:
        log.warning(
            "%s: skipped %d of %d images listed in metadata.csv", folder, len(skipped), len(rows)
        )
    if not images:
        raise DataError(f"{folder}: no usable image among {len(rows)} rows of metadata.csv")
    return PromptImageSet(images=torch.stack(images), prompts=prompts, skipped=skipped)
