"""Evaluation on the tiny digits-format model: metrics against a plain recomputation, determinism,
prompt-CSV generation with a pluggable detector, comparison/sweep aggregation and the CLI."""

import json

import pytest
import torch

from resalign_fast.eval.compare import DownstreamSpec, load_downstream, parse_groups, summarize
from resalign_fast.eval.evaluators import DigitsEvaluator, PromptEvaluator, read_prompt_csv
from resalign_fast.eval.metrics import frechet_distance_features
from resalign_fast.eval.report import compare_markdown, criteria
from resalign_fast.models.pipeline import load_model

FAST = dict(n_images=6, steps=2, guidance=3.0, batch_size=5)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir)


def test_digits_metrics_match_recomputation_and_are_deterministic(model):
    from resalign_fast.data.digits import caption, digits_split
    from resalign_fast.eval.classifier import load_classifier
    from resalign_fast.models.sampling import generate

    ev = DigitsEvaluator(concept=4, seed=11, **FAST)
    r1, r2 = ev.evaluate(model), DigitsEvaluator(concept=4, seed=11, **FAST).evaluate(model)
    assert r1 == r2
    assert DigitsEvaluator(concept=4, seed=12, **FAST).evaluate(model)["fd"] != r1["fd"]
    others = [d for d in range(10) if d != 4]
    assert ev.benign_prompts[:3] == [
        caption(0, 0),
        caption(1, 0),
        caption(2, 0),
    ] and ev.harm_prompts[0] == caption(4, 0)
    imgs = generate(
        model, ev.harm_prompts + ev.benign_prompts, steps=2, guidance=3.0, seed=11
    )  # other batch size
    clf = load_classifier()
    with torch.no_grad():
        pred, feats = clf(imgs).argmax(1), clf.features(imgs)
        x, y = digits_split("test", 16)
        real = clf.features(x[y != 4])
    labels = torch.tensor([others[i % 9] for i in range(6)])
    assert r1["harmful_rate"] == pytest.approx((pred[:6] == 4).float().mean().item())
    assert r1["benign_accuracy"] == pytest.approx((pred[6:] == labels).float().mean().item())
    assert r1["fd"] == pytest.approx(frechet_distance_features(feats[6:], real), rel=1e-4)
    assert "benign_accuracy" not in DigitsEvaluator(concept=4, benign=False, **FAST).evaluate(model)


def test_prompt_evaluator_with_external_detector(model, tmp_path):
    (tmp_path / "p.csv").write_text(
        'prompt,evaluation_seed\n"a handwritten digit one",1\nhandwritten two,2\n\n'
    )
    (tmp_path / "det.py").write_text(
        "class Bright:\n    name='bright'\n    def __init__(self, t=0.0): self.t=t\n"
        "    def scores(self, x): return x.flatten(1).mean(1)\n"
        "    def flags(self, x): return self.scores(x) > self.t\n"
    )
    assert read_prompt_csv(tmp_path / "p.csv") == ["a handwritten digit one", "handwritten two"]
    ev = PromptEvaluator(
        str(tmp_path / "p.csv"),
        f"{tmp_path / 'det.py'}:Bright",
        {"t": -0.5},
        images_per_prompt=3,
        steps=2,
        guidance=7.5,
        seed=5,
        batch_size=4,
    )
    res = ev.evaluate(model, image_dir=str(tmp_path / "img"))
    from resalign_fast.models.sampling import generate

    imgs = generate(
        model,
        ["a handwritten digit one"] * 3 + ["handwritten two"] * 3,
        steps=2,
        guidance=7.5,
        seed=5,
    )
    flags = imgs.flatten(1).mean(1) > -0.5
    assert res["n_images"] == 6 and res["harmful_rate"] == pytest.approx(
        flags.float().mean().item()
    )
    assert res["per_prompt"] == [int(flags[:3].sum()), int(flags[3:].sum())]
    assert sorted(p.name for p in (tmp_path / "img").iterdir()) == [
        f"{r}-{k}.png" for r in range(2) for k in range(3)
    ]
    with pytest.raises(ValueError, match="prompt column"):
        (tmp_path / "bad.csv").write_text("x\n1\n")
        read_prompt_csv(tmp_path / "bad.csv")


def _raw():
    # two models in "plain" (seeds 0, 1), one in "original"; hand-made harmful rates.
    def cell(h10, h20):
        return {
            "10": {"harmful_rate": h10, "benign_accuracy": 0.8},
            "20": {"harmful_rate": h20, "benign_accuracy": 0.7},
        }

    return {
        "original": {
            "o": {
                "before": {"harmful_rate": 0.6, "benign_accuracy": 0.9},
                "after": {"c": {"0": cell(0.5, 0.4), "1": cell(0.7, 0.6)}},
            }
        },
        "plain": {
            "p0": {
                "before": {"harmful_rate": 0.0, "benign_accuracy": 0.85},
                "after": {"c": {"0": cell(0.1, 0.2), "1": cell(0.3, 0.4)}},
            },
            "p1": {
                "before": {"harmful_rate": 0.02, "benign_accuracy": 0.87},
                "after": {"c": {"0": cell(0.0, 0.0), "1": cell(0.2, 0.2)}},
            },
        },
        "resalign": {
            "r0": {
                "before": {"harmful_rate": 0.0, "benign_accuracy": 0.88},
                "after": {"c": {"0": cell(0.0, 0.1), "1": cell(0.0, 0.1)}},
            }
        },
    }


def test_summarize_and_criteria_on_hand_made_results():
    spec = [DownstreamSpec("c", {}, (10, 20), False)]
    s = summarize(_raw(), spec)
    o20 = s["original"]["c"]["20"]["harmful_rate"]
    assert (
        o20["mean"] == pytest.approx(0.5) and o20["sem"] == pytest.approx(0.1) and o20["n"] == 2
    )  # across seeds
    p20 = s["plain"]["c"]["20"]["harmful_rate"]  # model means 0.3 and 0.1: SE across models = 0.1
    assert (
        p20["mean"] == pytest.approx(0.2)
        and p20["sem"] == pytest.approx(0.1)
        and p20["n_models"] == 2
    )
    assert s["plain"]["c"]["0"]["harmful_rate"]["mean"] == pytest.approx(0.01)
    c = criteria(s, spec)["c"]
    assert c["half_of_plain"] and c["both_near_zero_before"]  # 0.1 <= 0.2 / 2; 0.0 and 0.01 before
    assert c["benign_gap_points"] == pytest.approx(2.0) and c["benign_within_5_points"]
    md = compare_markdown(s, spec, "original")
    assert "| c | no | resalign |" in md and "0.20" in md


def test_parse_groups_and_downstream_file():
    assert parse_groups(["original=digits", "plain=a,b", "plain=c", "outputs/run-x/"]) == {
        "original": ["digits"],
        "plain": ["a", "b", "c"],
        "run-x": ["outputs/run-x/"],
    }
    specs = load_downstream("digits")
    assert len(specs) >= 4 and sum(s.in_pi is False for s in specs) >= 2


def _tiny_downstream(tmp_path):
    p = tmp_path / "ds.toml"
    p.write_text(
        '[[configs]]\nname = "a"\nin_pi = true\noptimizer = "adam"\nlearning_rate = 1e-3\n'
        "train_batch_size = 2\neval_steps = [1, 2]\n"
        '[[configs]]\nname = "b"\nin_pi = false\nalgorithm = "lora"\nrank = 2\nlearning_rate = '
        "1e-2\n"
        "train_batch_size = 2\neval_steps = [2]\n"
    )
    return p


def test_cli_single_compare_and_sweep(tiny_model_dir, tmp_path, capsys):
    from resalign_fast.evaluate import main

    common = ["--n_images", "4", "--sample_steps", "2", "--batch_size", "8", "--ft_seeds", "0,1"]
    assert (
        main(["--model", str(tiny_model_dir), "--output_dir", str(tmp_path / "one"), *common]) == 0
    )
    m = json.loads((tmp_path / "one" / "metrics.json").read_text())["metrics"]
    assert 0 <= m["harmful_rate"] <= 1 and m["n_harmful"] == 4

    out = tmp_path / "cmp"
    argv = [
        "--output_dir",
        str(out),
        "--downstream",
        str(_tiny_downstream(tmp_path)),
        *common,
        "--compare",
        f"original={tiny_model_dir}",
        f"plain={tiny_model_dir}",
    ]
    assert main(argv) == 0
    for f in ("report.md", "summary.json", "raw.json", "compare.png"):
        assert (out / f).is_file(), f
    cells = sorted((out / "cells").glob("*.json"))
    assert (
        len(cells) == 1 + 2 * 2
    )  # "before" once; 2 configs x 2 seeds (the same model twice is cached)
    summary = json.loads((out / "summary.json").read_text())["summary"]
    o, p = summary["original"]["a"]["2"]["harmful_rate"], summary["plain"]["a"]["2"]["harmful_rate"]
    assert o == p and o["n"] == 2  # same model, same seeds: identical cells
    stamps = [c.stat().st_mtime_ns for c in cells]
    assert main(argv) == 0  # everything reused
    assert [c.stat().st_mtime_ns for c in cells] == stamps

    sw = tmp_path / "sweep"
    assert (
        main(
            [
                "--output_dir",
                str(sw),
                *common,
                "--ft_seeds",
                "0",
                "--sweep_lrs",
                "1e-3,1e-2",
                "--sweep_steps",
                "1,2",
                "--sweep_algorithms",
                "full",
                "--sweep_batch_size",
                "2",
                "--sweep",
                f"tiny={tiny_model_dir}",
            ]
        )
        == 0
    )
    res = json.loads((sw / "sweep.json").read_text())["sweep"]["tiny"]["full"]
    assert set(res) == {"0.001", "0.01"} and set(res["0.01"]) == {"1", "2"}
    assert (sw / "sweep_tiny.png").is_file()
    assert (
        main(["--output_dir", str(tmp_path / "e"), "--downstream", "nope", "--compare", "x=digits"])
        == 2
    )
    assert "no such config file" in capsys.readouterr().err
