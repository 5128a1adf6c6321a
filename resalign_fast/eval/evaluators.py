"""What one evaluation of one model measures: the digits world, or a prompt CSV with a detector.

An evaluator has `evaluate(model, unet=None) -> dict` (unet overrides model.unet, e.g. a fine-tuned
copy) and `settings() -> dict` (everything that determines its result; the comparison caches on it).
Generation is seeded by the evaluator, never by the model under test, so every model is asked the
same prompts from the same noise.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from resalign_fast.eval.metrics import (
    benign_accuracy,
    frechet_distance_features,
    harmful_rate,
    rate,
)

PROMPT_COLUMNS = ("prompt", "text", "caption")

# Digits-world sampling: 25 DDIM steps (the project's default) and classifier-free guidance 1.5,
# chosen on the *original* models only, before any unlearned model was evaluated (100 images per
# metric, 25 steps; benign accuracy / FD / harmful rate of the concept 7):
#   embedded base (assets/digits_base, 3000 CPU steps, 2026-12-01): g 1: 0.95/42.6/0.95,
#       1.5: 0.99/40.6/0.99, 2: 0.99/57.1/0.86, 3: 0.61/201/0.32;
# the earlier 700-step base: g 1: 0.58/114/0.68, 1.5: 0.69/101/0.90, 2: 0.75/107/0.93, 3:
# 0.79/153/0.86;
#   GPU stand-in (5000 steps, 45 images): g 1: 0.96/50, 1.5: 0.98/49, 2: 0.93/73, 3: 0.42/237.
# Rule: the highest benign accuracy whose FD is within 10% of the best FD (g 3 oversaturates over
# 25 steps).
DIGITS_GUIDANCE = 1.5
DIGITS_STEPS = 25


class DigitsEvaluator:
    """Harmful rate, benign accuracy and Frechet distance on the digits world.

    Args:
        concept: the erased digit.
        n_images: images per metric: n from the concept's prompts (its caption templates in turn)
            and n from benign prompts (the nine other digits in turn, then the templates).
        steps, guidance: DDIM sampling (DIGITS_STEPS, DIGITS_GUIDANCE: see their comment).
        seed: generation seed (image i's noise depends only on (seed, i)).
        benign: also generate benign images (benign accuracy, FD); off for harmful-only sweeps.
        batch_size: prompts per UNet batch (classifier-free guidance doubles it).

    The Frechet distance compares the classifier's 64-d features of the benign images with those of
    the real test-split digits other than the concept (`digits_split("test")`, never trained on).
    """

    def __init__(
        self,
        concept: int = 7,
        n_images: int = 100,
        steps: int = DIGITS_STEPS,
        guidance: float = DIGITS_GUIDANCE,
        seed: int = 1234,
        benign: bool = True,
        batch_size: int = 200,
    ) -> None:
        from resalign_fast.data.digits import all_captions, caption
        from resalign_fast.eval.detectors import DigitDetector

        if n_images < 2:
            raise ValueError(
                f"n_images must be at least 2 (the Frechet distance needs a covariance), got "
                f"{n_images}"
            )
        self.concept, self.n, self.steps, self.guidance, self.seed = (
            concept,
            n_images,
            steps,
            guidance,
            seed,
        )
        self.benign, self.batch_size = benign, batch_size
        caps = all_captions(concept)
        self.harm_prompts = [caps[i % len(caps)] for i in range(n_images)]
        others = [d for d in range(10) if d != concept]
        self.benign_labels = torch.tensor([others[i % len(others)] for i in range(n_images)])
        self.benign_prompts = [
            caption(others[i % len(others)], i // len(others)) for i in range(n_images)
        ]
        self.detector = DigitDetector(concept)
        self._real = None

    def settings(self) -> dict:
        return {
            "kind": "digits",
            "concept": self.concept,
            "n_images": self.n,
            "steps": self.steps,
            "guidance": self.guidance,
            "seed": self.seed,
            "benign": self.benign,
        }

    def real_features(self) -> torch.Tensor:
        """(M, 64) classifier features of the real test-split digits other than the concept."""
        if self._real is None:
            from resalign_fast.data.digits import digits_split

            x, y = digits_split("test", 16)
            self._real = self.detector.features(x[y != self.concept])
        return self._real

    def generate(self, model, unet: torch.nn.Module | None = None) -> torch.Tensor:
        """(n or 2n, 1, 16, 16): harmful-prompt images, then benign-prompt images."""
        from resalign_fast.models.sampling import generate

        prompts = self.harm_prompts + (self.benign_prompts if self.benign else [])
        return generate(
            model,
            prompts,
            steps=self.steps,
            guidance=self.guidance,
            seed=self.seed,
            batch_size=self.batch_size,
            unet=unet,
        )

    def evaluate(self, model, unet: torch.nn.Module | None = None) -> dict:
        """{"harmful_rate", "benign_accuracy", "fd", "per_digit", "n_harmful", "n_benign"}
        (benign metrics only with benign)."""
        imgs = self.generate(model, unet)
        out = {
            "harmful_rate": harmful_rate(self.detector.predict(imgs[: self.n]), self.concept),
            "n_harmful": self.n,
        }
        if self.benign:
            b = imgs[self.n :]
            pred = self.detector.predict(b)
            out["benign_accuracy"] = benign_accuracy(pred, self.benign_labels)
            out["fd"] = frechet_distance_features(self.detector.features(b), self.real_features())
            out["per_digit"] = {
                str(d): rate(pred[self.benign_labels == d] == d)
                for d in self.benign_labels.unique().tolist()
            }
            out["concept_on_benign"] = rate(pred == self.concept)
            out["n_benign"] = self.n
        return out


def read_prompt_csv(path: str | Path, limit: int = 0) -> list[str]:
    """Prompts of a CSV with a `prompt` (or `text`, `caption`) column, in file order (first `limit`
    if > 0).

    Raises:
        ValueError: a missing file, no prompt column, or no rows.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such prompt file")
    with open(p, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        col = next((c for c in PROMPT_COLUMNS if c in (reader.fieldnames or [])), None)
        if col is None:
            raise ValueError(
                f"{p}: no prompt column, expected one of {PROMPT_COLUMNS} (columns: "
                f"{reader.fieldnames})"
            )
        prompts = [row[col].strip() for row in reader if (row.get(col) or "").strip()]
    if not prompts:
        raise ValueError(f"{p}: no prompts")
    return prompts[:limit] if limit > 0 else prompts


class PromptEvaluator:
    """Generate `images_per_prompt` images per CSV prompt and report the detector's flag rate.

    With NudeNet on the I2P sexual prompts this is the paper's IP (3 images per prompt, 30 DDIM
    steps, guidance 7.5). Images are written as <row>-<k>.png under `image_dir` when given.
    """

    def __init__(
        self,
        prompts_csv: str,
        detector: str = "nudenet",
        detector_kwargs: dict | None = None,
        images_per_prompt: int = 3,
        steps: int = 30,
        guidance: float = 7.5,
        seed: int = 0,
        batch_size: int = 8,
        limit: int = 0,
        image_dir: str | None = None,
    ) -> None:
        from resalign_fast.eval.detectors import get_detector

        self.prompts = read_prompt_csv(prompts_csv, limit)
        self.csv, self.det_name, self.det_kwargs = (
            str(prompts_csv),
            detector,
            dict(detector_kwargs or {}),
        )
        self.detector = get_detector(detector, **self.det_kwargs)
        self.k, self.steps, self.guidance, self.seed, self.batch_size = (
            images_per_prompt,
            steps,
            guidance,
            seed,
            batch_size,
        )
        self.limit, self.image_dir = limit, image_dir

    def settings(self) -> dict:
        return {
            "kind": "prompts",
            "csv": self.csv,
            "n_prompts": len(self.prompts),
            "detector": self.det_name,
            "detector_kwargs": {k: str(v) for k, v in self.det_kwargs.items()},
            "images_per_prompt": self.k,
            "steps": self.steps,
            "guidance": self.guidance,
            "seed": self.seed,
        }

    def evaluate(
        self, model, unet: torch.nn.Module | None = None, image_dir: str | None = None
    ) -> dict:
        """{"harmful_rate" (fraction flagged), "n_images", "per_prompt" (flagged count per prompt
        row)}."""
        from resalign_fast.models.sampling import generate

        prompts = [p for p in self.prompts for _ in range(self.k)]
        imgs = generate(
            model,
            prompts,
            steps=self.steps,
            guidance=self.guidance,
            seed=self.seed,
            batch_size=self.batch_size,
            unet=unet,
        )
        flags = self.detector.flags(imgs)
        d = image_dir or self.image_dir
        if d:
            save_images(imgs, Path(d), [f"{i // self.k}-{i % self.k}" for i in range(len(imgs))])
        per = flags.view(len(self.prompts), self.k).sum(1)
        return {"harmful_rate": rate(flags), "n_images": len(imgs), "per_prompt": per.tolist()}


def save_images(images: torch.Tensor, out: Path, names: list[str]) -> None:
    """Write (N, C, H, W) images in [-1, 1] as out/<name>.png."""
    from PIL import Image

    from resalign_fast.eval.detectors import to_uint8_rgb

    out.mkdir(parents=True, exist_ok=True)
    grey = images.shape[1] == 1
    for a, n in zip(to_uint8_rgb(images).numpy(), names):
        Image.fromarray(a[..., 0] if grey else a).save(out / f"{n}.png")
