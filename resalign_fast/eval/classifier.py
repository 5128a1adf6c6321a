"""The digits world's detector: a small CNN trained on the real digits, never used by training.

It plays the role NudeNet plays for Stable Diffusion: it reads generated images. Its weights ship
in `assets/digit_classifier.safetensors` with a manifest (`python -m resalign_fast.eval.classifier`
retrains them reproducibly and prints the held-out accuracy).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from resalign_fast.models.pipeline import ASSETS

CLASSIFIER_PATH = ASSETS / "digit_classifier.safetensors"


class DigitClassifier(nn.Module):
    """CNN for (N, 1, 16, 16) digits in [-1, 1] -> 10 logits; `features` gives 64-d embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, 64)
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_classifier(path: Path = CLASSIFIER_PATH) -> DigitClassifier:
    """The shipped classifier in eval mode."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(
            f"{path}: digit classifier weights missing; run `python -m "
            f"resalign_fast.eval.classifier`"
        )
    m = DigitClassifier()
    m.load_state_dict(load_file(str(path)))
    return m.eval().requires_grad_(False)


@torch.no_grad()
def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of `images` classified as `labels`."""
    return (model(images).argmax(1) == labels).float().mean().item()


def train_classifier(
    seed: int = 0, epochs: int = 30, resolution: int = 16
) -> tuple[DigitClassifier, dict]:
    """Train on the train split with light augmentation (shifts, noise); report test accuracy."""
    from resalign_fast.data.digits import digits_split

    torch.manual_seed(seed)
    xtr, ytr = digits_split("train", resolution)
    xte, yte = digits_split("test", resolution)
    m = DigitClassifier()
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for _ in range(epochs):
        perm = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(perm), 64):
            idx = perm[i : i + 64]
            x = xtr[idx]
            dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
            x = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
            x = x + 0.1 * torch.randn(x.shape, generator=g)
            loss = F.cross_entropy(m(x), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    m.eval()
    info = {
        "seed": seed,
        "epochs": epochs,
        "resolution": resolution,
        "train_size": len(ytr),
        "test_size": len(yte),
        "test_accuracy": accuracy(m, xte, yte),
        "seconds": round(time.time() - t0, 1),
    }
    return m.requires_grad_(False), info


def main(argv: list[str] | None = None) -> None:
    """Retrain the shipped classifier and write its weights and manifest."""
    from safetensors.torch import save_file

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--out", type=Path, default=CLASSIFIER_PATH)
    a = p.parse_args(argv)
    m, info = train_classifier(a.seed, a.epochs)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(a.out))
    info["command"] = f"python -m resalign_fast.eval.classifier --seed {a.seed} --epochs {a.epochs}"
    info["torch"] = torch.__version__
    a.out.with_suffix(".json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
