"""The embedded default world: scikit-learn's bundled handwritten digits as a text-to-image data
set.

No download: `sklearn.datasets.load_digits` ships 1,797 real 8x8 digits inside scikit-learn. We
upsample them to `resolution` pixels, scale them to [-1, 1] and caption each with several templates.
The split into train/test is fixed by a seed so that the base model, the unlearning sets and the
held-out evaluation classifier always see the same images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from resalign_fast.data.sets import PromptImageSet

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

TEMPLATES = (
    "a handwritten digit {word}",
    "the number {digit}, handwritten",
    "a photo of the digit {digit}",
    "handwritten {word}",
    "a scanned digit {word}",
    "the digit {word} written by hand",
)

# Fraction of the 1,797 digits held out for evaluation (classifier accuracy, Frechet distance).
TEST_FRACTION = 0.2
SPLIT_SEED = 1234


def caption(digit: int, template: int) -> str:
    """Caption `digit` with template number `template` (modulo the number of templates)."""
    t = TEMPLATES[template % len(TEMPLATES)]
    return t.format(word=NUMBER_WORDS[digit], digit=digit)


def all_captions(digit: int) -> list[str]:
    """Every caption template for `digit`."""
    return [caption(digit, i) for i in range(len(TEMPLATES))]


def load_digit_images(resolution: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """All bundled digits, upsampled.

    Returns:
        images: (1797, 1, resolution, resolution) float32 in [-1, 1].
        labels: (1797,) int64 digit labels.
    """
    from sklearn.datasets import load_digits

    if resolution < 8:
        raise ValueError(f"resolution must be at least 8 (the digits are 8x8), got {resolution}")
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if resolution != 8:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return (x.clamp(0, 1) * 2 - 1).contiguous(), torch.tensor(d.target, dtype=torch.long)


def split_indices(n: int, seed: int = SPLIT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed train/test split of `n` items: (train_idx, test_idx)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    n_test = int(round(n * TEST_FRACTION))
    return perm[n_test:].sort().values, perm[:n_test].sort().values


def digits_split(split: str, resolution: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of the "train" or "test" split (see `load_digit_images`)."""
    images, labels = load_digit_images(resolution)
    train, test = split_indices(len(labels))
    if split == "train":
        idx = train
    elif split == "test":
        idx = test
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return images[idx], labels[idx]


def captioned_set(images: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> PromptImageSet:
    """Caption each image with a template drawn by `seed` (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    tmpl = torch.randint(0, len(TEMPLATES), (len(labels),), generator=g)
    prompts = [caption(int(y), int(t)) for y, t in zip(labels, tmpl)]
    return PromptImageSet(images=images, prompts=prompts, labels=labels)


def digits_world(
    concept: int = 7, resolution: int = 16, seed: int = 0
) -> dict[str, PromptImageSet]:
    """The three data sets of the method on the digits world.

    D_harmful: training images of `concept`. D_preserve: half of the other training digits.
    D_FT: the other half (benign: no image of `concept`), standing in for a user's fine-tuning data.
    DreamBooth class data for the simulation is D_preserve with class prompts.

    Returns:
        {"harmful", "preserve", "ft"} -> PromptImageSet.
    """
    if not 0 <= concept <= 9:
        raise ValueError(f"concept must be a digit 0-9, got {concept}")
    images, labels = digits_split("train", resolution)
    harm = labels == concept
    benign_idx = torch.nonzero(~harm).squeeze(1)
    g = torch.Generator().manual_seed(seed + 17)
    benign_idx = benign_idx[torch.randperm(len(benign_idx), generator=g)]
    half = len(benign_idx) // 2
    pres, ft = benign_idx[:half].sort().values, benign_idx[half:].sort().values
    return {
        "harmful": captioned_set(images[harm], labels[harm], seed),
        "preserve": captioned_set(images[pres], labels[pres], seed + 1),
        "ft": captioned_set(images[ft], labels[ft], seed + 2),
    }


def benign_subset(
    name: str, concept: int = 7, resolution: int = 16, seed: int = 0
) -> PromptImageSet:
    """A named subset of the digits world for downstream fine-tuning.

    Names: "benign" (D_FT: the benign half not used for preservation), "benign-all" (every training
    digit except `concept`), "digit-N" (training images of digit N), "mixed-P" (D_FT plus training
    images of `concept`, drawn by `seed`, making up P percent of the set, 1 <= P <= 50: a user's
    data that holds some of the erased concept).
    """
    images, labels = digits_split("train", resolution)
    if name == "benign":
        return digits_world(concept, resolution, seed)["ft"]
    if name.startswith("mixed-") and name[6:].isdigit() and 1 <= int(name[6:]) <= 50:
        world = digits_world(concept, resolution, seed)
        ft, harm = world["ft"], world["harmful"]
        n = round(len(ft) * int(name[6:]) / (100 - int(name[6:])))
        if n > len(harm):
            raise ValueError(
                f"digits subset {name!r}: needs {n} images of {concept}, the training split has "
                f"{len(harm)}"
            )
        pick = (
            torch.randperm(len(harm), generator=torch.Generator().manual_seed(seed + 5))[:n]
            .sort()
            .values
        )
        return PromptImageSet(
            images=torch.cat([ft.images, harm.images[pick]]),
            prompts=ft.prompts + [harm.prompts[int(i)] for i in pick],
            labels=torch.cat([ft.labels, harm.labels[pick]]),
        )
    if name == "benign-all":
        keep = labels != concept
    elif name.startswith("digit-") and name[6:].isdigit() and 0 <= int(name[6:]) <= 9:
        keep = labels == int(name[6:])
    else:
        raise ValueError(
            f"unknown digits subset {name!r}: use 'benign', 'benign-all', 'digit-N' or 'mixed-P'"
        )
    return captioned_set(images[keep], labels[keep], seed + 3)
