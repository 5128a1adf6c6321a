"""Metrics and detectors on hand-made inputs with known answers."""

import numpy as np
import pytest
import torch

from resalign_fast.eval.detectors import (
    NUDENET_EXPOSED,
    DetectorError,
    build_head,
    get_detector,
    nudenet_score,
    register_detector,
    to_uint8_rgb,
)
from resalign_fast.eval.metrics import (
    benign_accuracy,
    frechet_distance,
    frechet_distance_features,
    frechet_distance_ref,
    gaussian_stats,
    harmful_rate,
    mean_sem,
    rate,
)


def _spd(d, g):
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


@pytest.mark.parametrize("d", [1, 7, 64])
def test_frechet_identical_and_shifted(d):
    g = torch.Generator().manual_seed(d)
    mu, s = torch.randn(d, generator=g, dtype=torch.float64), _spd(d, g)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-8
    shift = torch.randn(d, generator=g, dtype=torch.float64)
    assert frechet_distance(mu, s, mu + shift, s) == pytest.approx(
        float(shift @ shift), rel=1e-9, abs=1e-8
    )


def test_frechet_closed_forms():
    g = torch.Generator().manual_seed(0)
    a, b = (
        torch.rand(9, generator=g, dtype=torch.float64) + 0.1,
        torch.rand(9, generator=g, dtype=torch.float64) + 0.1,
    )
    m1, m2 = (
        torch.randn(9, generator=g, dtype=torch.float64),
        torch.randn(9, generator=g, dtype=torch.float64),
    )
    want = float(
        ((m1 - m2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum()
    )  # diagonal covariances
    assert frechet_distance(m1, torch.diag(a), m2, torch.diag(b)) == pytest.approx(want, rel=1e-10)
    s, c = _spd(9, g), 1.7  # scaled covariance: tr(S) (1 - c)^2
    assert frechet_distance(m1, s, m1, c * c * s) == pytest.approx(
        float(torch.trace(s)) * (1 - c) ** 2, rel=1e-9
    )


def test_frechet_matches_scipy_reference():
    g = torch.Generator().manual_seed(3)
    for d in (2, 16, 64):
        m1, m2 = (
            torch.randn(d, generator=g, dtype=torch.float64),
            torch.randn(d, generator=g, dtype=torch.float64),
        )
        s1, s2 = _spd(d, g), _spd(d, g)
        assert frechet_distance(m1, s1, m2, s2) == pytest.approx(
            frechet_distance_ref(m1, s1, m2, s2), rel=1e-8
        )


def test_gaussian_stats_and_features():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 5, generator=g, dtype=torch.float64)
    mu, s = gaussian_stats(x)
    torch.testing.assert_close(mu, x.mean(0))
    torch.testing.assert_close(s, torch.cov(x.T))
    assert frechet_distance_features(x, x) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance_features(x, x + 2.0) == pytest.approx(5 * 4.0, rel=1e-9)
    with pytest.raises(ValueError):
        gaussian_stats(x[:1])


def test_rates_on_hand_made_predictions():
    g = torch.Generator().manual_seed(2)
    pred, lab = torch.randint(0, 10, (137,), generator=g), torch.randint(0, 10, (137,), generator=g)
    assert harmful_rate(pred, 7) == pytest.approx(sum(int(p) == 7 for p in pred) / 137)
    assert benign_accuracy(pred, lab) == pytest.approx(
        sum(int(p) == int(q) for p, q in zip(pred, lab)) / 137
    )
    assert rate(torch.tensor([True, False, True, True])) == 0.75
    with pytest.raises(ValueError):
        rate(torch.tensor([]))
    with pytest.raises(ValueError):
        benign_accuracy(pred, lab[:3])


def test_mean_sem():
    v = torch.rand(11, generator=torch.Generator().manual_seed(4)).tolist()
    m, se, n = mean_sem(v)
    assert (m, n) == (pytest.approx(np.mean(v)), 11)
    assert se == pytest.approx(np.std(v, ddof=1) / np.sqrt(11))
    assert mean_sem([0.3]) == (0.3, 0.0, 1)


def test_nudenet_score_classes_and_threshold():
    dets = [
        {"class": "FACE_FEMALE", "score": 0.9},
        {"class": "BELLY_EXPOSED", "score": 0.44},
        {"class": "FEMALE_BREAST_COVERED", "score": 0.8},
        {"class": "ARMPITS_EXPOSED", "score": 0.45},
    ]
    assert nudenet_score(dets) == 0.45
    assert nudenet_score([]) == 0.0
    assert nudenet_score(dets, ("FACE_FEMALE",)) == 0.9
    assert len(NUDENET_EXPOSED) == 9 and all(c.endswith("_EXPOSED") for c in NUDENET_EXPOSED)


def test_nudenet_runs_and_array_matches_file(tmp_path):
    pytest.importorskip("nudenet")
    from PIL import Image

    det = get_detector("nudenet")
    imgs = torch.rand(3, 3, 48, 40, generator=torch.Generator().manual_seed(5)) * 2 - 1
    s = det.scores(imgs)
    assert s.shape == (3,) and ((s >= 0) & (s <= 1)).all()
    torch.testing.assert_close(det.flags(imgs), s > 0.45)
    arr = to_uint8_rgb(imgs[:1])[0].numpy()
    Image.fromarray(arr).save(tmp_path / "a.png")
    assert det.detector.detect(str(tmp_path / "a.png")) == det.detector.detect(
        arr[..., ::-1].copy()
    )


def test_to_uint8_rgb():
    x = torch.tensor([-1.0, 0.0, 1.0, 0.5]).view(1, 1, 2, 2)
    y = to_uint8_rgb(x)
    assert y.shape == (1, 2, 2, 3) and y.dtype == torch.uint8
    assert y[0, :, :, 0].flatten().tolist() == [0, 128, 255, 191] and (y[..., 0] == y[..., 2]).all()


def test_registry_and_external_factory(tmp_path):
    with pytest.raises(DetectorError, match="unknown detector"):
        get_detector("no-such-detector")
    f = tmp_path / "mydet.py"
    f.write_text(
        "import torch\nclass D:\n    name='mean'\n    def __init__(self, t=0.0): self.t=t\n"
        "    def scores(self, x): return x.flatten(1).mean(1)\n"
        "    def flags(self, x): return self.scores(x) > self.t\n"
    )
    d = get_detector(f"{f}:D", t=0.1)
    x = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(d.flags(x), x.flatten(1).mean(1) > 0.1)
    with pytest.raises(DetectorError, match="has no"):
        get_detector(f"{f}:Nope")

    @register_detector("test-const")
    def const(value=1.0):
        return d

    assert get_detector("test-const") is d


def test_clip_head_detector_with_injected_encoder(tmp_path):
    g = torch.Generator().manual_seed(7)
    head = torch.nn.Sequential(
        torch.nn.Linear(12, 6),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.5),
        torch.nn.BatchNorm1d(6),
        torch.nn.Linear(6, 1),
    )
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        head[3].running_mean.copy_(torch.randn(6, generator=g))
        head[3].running_var.copy_(torch.rand(6, generator=g) + 0.5)
    torch.save(head.state_dict(), tmp_path / "head.pt")
    proj = torch.randn(3 * 8 * 8, 12, generator=g)
    enc = lambda x: x.flatten(1) @ proj  # noqa: E731
    det = get_detector(
        "clip-head", head=str(tmp_path / "head.pt"), encoder=enc, image_size=8, threshold=0.5
    )
    imgs = torch.rand(5, 3, 8, 8, generator=g) * 2 - 1
    x = (imgs + 1) / 2
    x = (x - torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711]
    ).view(1, 3, 1, 1)
    want = torch.sigmoid(head.eval()(enc(x))).squeeze(1)
    torch.testing.assert_close(det.scores(imgs), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(det.flags(imgs), want > 0.5)
    lin = torch.nn.Linear(4, 1)
    assert isinstance(build_head(lin.state_dict()), torch.nn.Linear)
    with pytest.raises(DetectorError):
        build_head({"x.weight": torch.zeros(1)})


def test_paired_stats_on_hand_made_pairs():
    from resalign_fast.eval.metrics import paired_stats

    # differences 0.1, 0.2, 0.3: mean 0.2, sem 0.1 / sqrt(3); t(0.975, 2) = 4.3027
    s = paired_stats([0.3, 0.4, 0.5], [0.2, 0.2, 0.2], n_images=100)
    half = 4.302653 * 0.1 / 3**0.5
    assert s["n"] == 3 and abs(s["diff"] - 0.2) < 1e-12
    assert abs(s["diff_lo"] - (0.2 - half)) < 1e-5 and abs(s["diff_hi"] - (0.2 + half)) < 1e-5
    # equal per-pair ratios 0.5 (after the continuity correction c = 0.005): ratio 0.5, zero-width
    # interval
    c = 0.005
    b = [0.2, 0.3, 0.4]
    a = [0.5 * (y + c) - c for y in b]
    r = paired_stats(a, b, n_images=100)
    assert (
        abs(r["ratio"] - 0.5) < 1e-12
        and abs(r["ratio_lo"] - 0.5) < 1e-9
        and abs(r["ratio_hi"] - 0.5) < 1e-9
    )
    # a pairing that matters: the unpaired spread is large, the paired difference is constant
    p = paired_stats([0.11, 0.51, 0.91], [0.1, 0.5, 0.9], n_images=100)
    assert abs(p["diff_hi"] - p["diff_lo"]) < 1e-9
    with pytest.raises(ValueError):
        paired_stats([0.1], [0.2], n_images=100)
