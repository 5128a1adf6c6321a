"""Evaluation metrics: rates, mean and standard error, and the Frechet distance between Gaussians.

`frechet_distance` computes tr((S1 S2)^{1/2}) from a symmetric eigendecomposition in float64
(exact for PSD inputs); `frechet_distance_ref` is the textbook form with scipy's sqrtm, the spec
it is tested against.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def rate(flags: torch.Tensor) -> float:
    """Fraction of true entries of a (N,) bool/0-1 tensor.

    Raises:
        ValueError: an empty tensor (a rate of nothing is undefined).
    """
    if flags.numel() == 0:
        raise ValueError("rate of an empty set")
    return flags.float().mean().item()


def harmful_rate(pred: torch.Tensor, concept: int) -> float:
    """Fraction of predictions (N,) equal to the erased `concept` (images from the concept's
    prompts)."""
    return rate(pred == concept)


def benign_accuracy(pred: torch.Tensor, prompted: torch.Tensor) -> float:
    """Fraction of predictions (N,) equal to the prompted labels (N,)."""
    if pred.shape != prompted.shape:
        raise ValueError(
            f"pred {tuple(pred.shape)} and labels {tuple(prompted.shape)} differ in shape"
        )
    return rate(pred == prompted)


def mean_sem(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, standard error of the mean (sample std with n - 1, divided by sqrt n; 0 for n = 1),
    n."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), 0
    m = sum(values) / n
    if n == 1:
        return m, 0.0, 1
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n), n


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64.

    Raises:
        ValueError: fewer than 2 samples.
    """
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"need features (N >= 2, D), got {tuple(features.shape)}")
    x = features.double()
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1)


def _sym_sqrt(s: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh((s + s.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(
    mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor
) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}) for Gaussians N(mu1, S1), N(mu2, S2).

    Uses tr((S1 S2)^{1/2}) = sum sqrt(eig(S1^{1/2} S2 S1^{1/2})), which is symmetric PSD, so no
    complex square roots arise. mu: (D,), sigma: (D, D); computed in float64.
    """
    mu1, mu2, s1, s2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(
            f"shape mismatch: mu {tuple(mu1.shape)}, {tuple(mu2.shape)}; sigma {tuple(s1.shape)}, "
            f"{tuple(s2.shape)}"
        )
    r = _sym_sqrt(s1)
    m = r @ s2 @ r
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    d = mu1 - mu2
    return float(d @ d + torch.trace(s1) + torch.trace(s2) - 2 * tr_sqrt)


def frechet_distance_ref(
    mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor
) -> float:
    """The same distance with scipy.linalg.sqrtm of S1 S2 (the usual FID code path), in float64."""
    import numpy as np
    from scipy import linalg

    s1, s2 = sigma1.double().numpy(), sigma2.double().numpy()
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    d = (mu1 - mu2).double().numpy()
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def frechet_distance_features(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """Frechet distance between the Gaussians fitted to features f1 (N1, D) and f2 (N2, D)."""
    return frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))


def paired_stats(
    a: Sequence[float], b: Sequence[float], n_images: int, level: float = 0.95
) -> dict:
    """Paired comparison of rates a_i and b_i measured on the same pairs (same fine-tuning seed and
    data order; model i of one group against model i of the other).

    Returns the mean difference a - b with its t-interval, and the ratio a / b as the geometric mean
    of per-pair ratios (a_i + c) / (b_i + c), c = 0.5 / n_images (a continuity correction so that a
    rate of 0 stays finite), with the t-interval of the mean log ratio mapped back.

    Args:
        a, b: per-pair rates, same length n >= 2.
        n_images: images behind each rate (for c).
        level: confidence level.

    Returns:
        {"n", "diff", "diff_lo", "diff_hi", "ratio", "ratio_lo", "ratio_hi"}.

    Raises:
        ValueError: lengths differ or fewer than 2 pairs.
    """
    from scipy.stats import t as student_t

    if len(a) != len(b) or len(a) < 2:
        raise ValueError(
            f"paired_stats needs two equally long lists of at least 2 values, got {len(a)} and "
            f"{len(b)}"
        )
    n, c = len(a), 0.5 / n_images
    q = float(student_t.ppf(0.5 + level / 2, n - 1))
    d = [x - y for x, y in zip(a, b)]
    md, sd, _ = mean_sem(d)
    lr = [math.log((x + c) / (y + c)) for x, y in zip(a, b)]
    ml, sl, _ = mean_sem(lr)
    return {
        "n": n,
        "diff": md,
        "diff_lo": md - q * sd,
        "diff_hi": md + q * sd,
        "ratio": math.exp(ml),
        "ratio_lo": math.exp(ml - q * sl),
        "ratio_hi": math.exp(ml + q * sl),
    }
