"""Nothing broken is saved or reported as done, and a first run explains itself: one test
per item; subprocesses where the exit code or a kill matters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import run_and_kill, train_args

from resalign_fast import evaluate, finetune, prepare_data, train
from resalign_fast.cli import parse_config
from resalign_fast.config import ConfigError, ResAlignConfig, load_toml, to_toml
from resalign_fast.runs import lock_folder

ROOT = Path(__file__).resolve().parents[1]


def _ft_args(model, out, *extra):
    return [
        "--pretrained_model_name_or_path",
        str(model),
        "--output_dir",
        str(out),
        "--max_train_steps",
        "3",
        "--train_batch_size",
        "2",
        "--learning_rate",
        "1e-3",
        "--device",
        "cpu",
        *extra,
    ]


def _train_args(model, space, out, *extra):
    return train_args(model, space, out, "r", *extra, outer_steps=2, checkpoint_every=1)


def _files(folder: Path) -> list[str]:
    return (
        sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        if folder.exists()
        else []
    )


# 1. an exploding fine-tune saves nothing
# -------------------------------------------------------------
@pytest.mark.parametrize("lr", ["1e30", "1e12"])
def test_finetune_that_explodes_saves_no_model(tiny_model_dir, tmp_path, capsys, lr):
    out = tmp_path / "ft"
    rc = finetune.main(
        _ft_args(
            tiny_model_dir,
            out,
            "--optimizer",
            "sgd",
            "--max_grad_norm",
            "0",
            "--learning_rate",
            lr,
            "--checkpointing_steps",
            "1,2,3",
        )
    )
    err = capsys.readouterr().err
    assert rc == 3 and "error:" in err, err
    saved = _files(out)
    assert not any(f.startswith(("model/", "checkpoint-")) for f in saved), saved


# 2. NaN/inf/boolean numbers are refused at parse time, before anything is written
# ------------------------
NON_FINITE = [
    (train.main, ["--lam", "nan"]),
    (train.main, ["--esd_eta", "nan"]),
    (train.main, ["--lr", "nan"]),
    (train.main, ["--gamma", "inf"]),
    (finetune.main, ["--learning_rate", "nan"]),
    (finetune.main, ["--learning_rate", "inf"]),
    (evaluate.main, ["--guidance", "nan"]),
    (prepare_data.main, ["--guidance", "nan"]),
    (prepare_data.main, ["--guidance", "inf"]),
]


@pytest.mark.parametrize(
    "main, flags", NON_FINITE, ids=lambda x: " ".join(x) if isinstance(x, list) else x.__module__
)
def test_non_finite_numbers_rejected_before_writing(tiny_model_dir, tmp_path, capsys, main, flags):
    out = tmp_path / "out"
    if main is prepare_data.main:
        (tmp_path / "p.txt").write_text("a digit\n")
        argv = [
            "--prompts",
            str(tmp_path / "p.txt"),
            "--out",
            str(out),
            "--pretrained_model_name_or_path",
            str(tiny_model_dir),
        ]
    elif main is evaluate.main:
        argv = ["--output_dir", str(out), "--model", str(tiny_model_dir)]
    else:
        argv = ["--output_dir", str(out), "--pretrained_model_name_or_path", str(tiny_model_dir)]
    rc = main(argv + flags)
    err = capsys.readouterr().err
    assert rc == 2 and "error:" in err and "finite" in err and "Traceback" not in err, err
    assert not out.exists()


def test_toml_booleans_and_non_finite_are_not_numbers(tmp_path):
    for body, key in [
        ("lr = true", "lr"),
        ("lam = nan", "lam"),
        ("gamma = inf", "gamma"),
        ("iters = false", "iters"),
    ]:
        (tmp_path / "c.toml").write_text(body + "\n")
        with pytest.raises(ConfigError, match=key):
            parse_config(["--config", str(tmp_path / "c.toml")])
    (tmp_path / "c.toml").write_text("progress = 1\n")  # 0/1 stay booleans
    assert parse_config(["--config", str(tmp_path / "c.toml")]).progress is True


def test_memory_flags_reject_non_positive(capsys):
    from resalign_fast import memory

    with pytest.raises(SystemExit) as e:
        memory.main(["--model", "tiny", "--resolution", "0"])
    assert "error:" in str(e.value)


# 3. exit codes: a diverged model or mostly skipped steps end non-zero
# ---------------------------------
def test_train_whose_model_output_explodes_exits_3(
    tiny_model_dir, tiny_ft_space, tmp_path, capsys, monkeypatch
):
    from resalign_fast.models import health

    monkeypatch.setattr(health, "MAX_OUTPUT_RMS", 1e-9)  # any output counts as exploding
    rc = train.main(_train_args(tiny_model_dir, tiny_ft_space, tmp_path))
    err = capsys.readouterr().err
    assert rc == 3 and "error:" in err and "not exporting" in err, err
    run = tmp_path / "r"
    assert not (run / "model").exists() and (run / "checkpoints" / "last.pt").is_file()


def test_train_with_most_steps_skipped_exits_3(
    tiny_model_dir, tiny_ft_space, tmp_path, capsys, monkeypatch
):
    from resalign_fast import bilevel

    real = bilevel.simulate_finetune
    monkeypatch.setattr(
        bilevel, "simulate_finetune", lambda *a, **k: [p * float("nan") for p in real(*a, **k)]
    )
    rc = train.main(_train_args(tiny_model_dir, tiny_ft_space, tmp_path, "--nan_policy", "skip"))
    err = capsys.readouterr().err
    assert rc == 3 and "skipped" in err, err
    assert not (tmp_path / "r" / "model").exists()


# 4. finetune never writes over an earlier run; --resume continues it exactly
# ----------------------------
def test_finetune_refuses_an_earlier_run_without_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ft"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1}\n')
    (out / "config.toml").write_text("# an earlier run\n")
    before = {f: (out / f).read_bytes() for f in _files(out)}
    assert finetune.main(_ft_args(tiny_model_dir, out)) == 2
    assert "--resume" in capsys.readouterr().err
    assert {f: (out / f).read_bytes() for f in _files(out)} == before


def test_finetune_sigkill_then_resume_equals_uninterrupted(tiny_model_dir, tmp_path):
    from resalign_fast.models.pipeline import load_model

    steps = ["--max_train_steps", "8", "--checkpoint_every", "2", "--num_threads", "1"]
    ref = tmp_path / "ref"
    assert finetune.main(_ft_args(tiny_model_dir, ref, *steps)) == 0
    out = tmp_path / "ft"
    args = _ft_args(tiny_model_dir, out, *steps)
    run_and_kill(
        "resalign_fast.finetune", args, out / "log.jsonl", 5
    )  # after the checkpoint of step 4, inside step 5 or 6
    assert not (out / "model").exists()
    assert finetune.main(args + ["--resume"]) == 0
    a, b = load_model(ref / "model").unet, load_model(out / "model").unet
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows == [json.loads(x) for x in (ref / "log.jsonl").read_text().splitlines()]


# 5. one `error:` line instead of a traceback
# -------------------------------------------------------------
def test_bad_inputs_give_one_error_line(tiny_model_dir, tiny_ft_space, tmp_path, capsys):
    file = tmp_path / "afile"
    file.write_text("x")
    (tmp_path / "p.txt").write_text("a digit\n")
    (tmp_path / "pic.toml").write_text("[space]\nlr = [1e-3]\nsteps = [2.5]\n")
    cases = [
        (
            finetune.main,
            _ft_args(tiny_model_dir, tmp_path / "a", "--train_data", "digit-x"),
            "digit-x",
        ),
        (
            prepare_data.main,
            [
                "--prompts",
                str(tmp_path / "p.txt"),
                "--out",
                str(file),
                "--pretrained_model_name_or_path",
                str(tiny_model_dir),
            ],
            "afile",
        ),
        (train.main, _train_args(tiny_model_dir, tmp_path / "pic.toml", tmp_path / "b"), "steps"),
    ]
    for main, argv, name in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") or "\nerror:" in err, err
        assert "Traceback" not in err and name in err, err
    assert file.read_text() == "x"


# 6. prepare_data --guidance nan: covered by test_non_finite_numbers_rejected_before_writing; a
# finite
#    guidance still generates images that are not all black
def test_prepare_data_images_are_not_blank(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a digit\n\nanother\n")
    out = tmp_path / "d"
    assert (
        prepare_data.main(
            [
                "--prompts",
                str(tmp_path / "p.txt"),
                "--out",
                str(out),
                "--steps",
                "2",
                "--pretrained_model_name_or_path",
                str(tiny_model_dir),
            ]
        )
        == 0
    )
    assert "1 blank prompt(s) skipped" in capsys.readouterr().out  # the count the docs promise
    from resalign_fast.data.sets import load_image_folder

    s = load_image_folder(out, 16, 1)
    assert len(s.prompts) == 2 and float(s.images.std()) > 0


# 7. atomic export, and one run per folder
# ---------------------------------------------------------------
def test_kill_during_finetune_export_leaves_no_loadable_model(tiny_model_dir, tmp_path):
    """A subprocess killed inside the model save (after the UNet was written) leaves no model/."""
    out = tmp_path / "ft"
    code = (
        "import os, signal, sys\n"
        "import resalign_fast.models.pipeline as pl\n"
        "real = pl.save_model\n"
        "def die(model, path, *a, **k):\n"
        "    real(model, path, *a, **k)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "pl.save_model = die\n"
        "from resalign_fast import finetune\n"
        f"sys.exit(finetune.main({_ft_args(tiny_model_dir, out)!r}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        timeout=240,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not (out / "model").exists()
    assert any(
        p.name.startswith(".model.tmp-") for p in out.iterdir()
    )  # the half-written folder, hidden


def test_second_run_into_a_locked_folder_is_refused(
    tiny_model_dir, tiny_ft_space, tmp_path, capsys
):
    held = lock_folder(tmp_path / "r")
    try:
        assert train.main(_train_args(tiny_model_dir, tiny_ft_space, tmp_path)) == 2
        assert "in use by another run" in capsys.readouterr().err
        assert finetune.main(_ft_args(tiny_model_dir, tmp_path / "r")) == 2
        assert "in use by another run" in capsys.readouterr().err
    finally:
        held.close()


# 8. config.toml survives any string
# ----------------------------------------------------------------------
def test_to_toml_escapes_strings(tmp_path):
    weird = 'out"dir\\with\ttab\nand "quotes" \\\\ é'
    cfg = ResAlignConfig(output_dir=weird, run_name='a"b', harmful_data="C:\\data\\harm")
    (tmp_path / "c.toml").write_text(to_toml(cfg))
    back = load_toml(tmp_path / "c.toml")
    assert (
        back["output_dir"] == weird
        and back["run_name"] == 'a"b'
        and back["harmful_data"] == "C:\\data\\harm"
    )
    assert parse_config(["--config", str(tmp_path / "c.toml")]) == cfg


# first run
# -----------------------------------------------------------------------------------------------
def test_train_reports_one_line_per_step_and_a_summary(
    tiny_model_dir, tiny_ft_space, tmp_path, capsys, caplog
):
    import logging

    with caplog.at_level(logging.INFO):
        assert (
            train.main(_train_args(tiny_model_dir, tiny_ft_space, tmp_path, "--guard", "reference"))
            == 0
        )
    err = capsys.readouterr().err
    steps = [r for r in caplog.records if r.getMessage().startswith("outer step")]
    assert len(steps) == 2
    noisy = [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith("resalign_fast.hypergrad")
    ]
    assert noisy == []  # retries and fallbacks go into the step line and the summary
    assert "summary: erased" in err and "next: python -m resalign_fast.evaluate" in err
    assert str(tmp_path / "r") in err


def test_sample_grid_shows_every_benign_digit(tiny_model_dir, tiny_ft_space, tmp_path, monkeypatch):
    from resalign_fast.data.digits import caption

    seen = []
    monkeypatch.setattr(
        train,
        "sample_grid",
        lambda cfg, model, harm, benign, path, **k: seen.append((harm, benign)),
    )
    assert (
        train.main(
            _train_args(
                tiny_model_dir,
                tiny_ft_space,
                tmp_path,
                "--samples_per_prompt",
                "1",
                "--outer_steps",
                "1",
                "--concept",
                "7",
            )
        )
        == 0
    )
    assert len(seen) == 2  # before and after
    for harm, benign in seen:
        assert benign == [caption(d, 0) for d in range(10) if d != 7] and harm == [
            caption(7, 0),
            caption(7, 1),
        ]


def test_help_texts(capsys):
    for main, prog in [
        (train.main, "python -m resalign_fast.train"),
        (finetune.main, "python -m resalign_fast.finetune"),
        (evaluate.main, "python -m resalign_fast.evaluate"),
    ]:
        with pytest.raises(SystemExit):
            main(["--help"])
        out = capsys.readouterr().out
        assert out.startswith(f"usage: {prog}"), out[:200]
    with pytest.raises(SystemExit):
        train.main(["--help"])
    out = capsys.readouterr().out
    assert "model/unet/" in out and "{stable,reference}" in out
    assert "--lr FLOAT, --learning_rate FLOAT" in out
    with pytest.raises(SystemExit):
        finetune.main(["--help"])
    out = capsys.readouterr().out
    examples = out[out.index("Examples:") :]
    assert (
        "\n    python -m resalign_fast.finetune --algorithm lora" in examples
    )  # one example per line
    from resalign_fast import memory

    with pytest.raises(SystemExit):
        memory.main(["--help"])
    out = capsys.readouterr().out
    assert "--sim_steps" in out and "--no_reference" in out


def test_train_accepts_learning_rate_alias():
    assert parse_config(["--learning_rate", "3e-4"]).lr == 3e-4


def test_memory_report_speaks_only_of_traced_configs(capsys):
    from resalign_fast import memory

    memory.main(
        [
            "--model",
            "tiny",
            "--resolution",
            "8",
            "--target",
            "cpu",
            "--configs",
            "lora-sgd-standard",
            "--hvp",
            "exact,jvp",
            "--attention",
            "fused",
            "--checkpointing",
            "on",
            "--no_lean",
        ]
    )
    out = capsys.readouterr().out
    assert "largest configuration" not in out and "the paper reports" not in out
    assert (
        "all configs incl. full-parameter" not in out
        and ": met" not in out
        and "NOT met" not in out
    )
    assert "traced LoRA configs" in out
    assert (
        "forward-mode (jvp) HVPs cannot run under activation recomputation" in out
    )  # readable footnote


def test_human_reports_round_floats():
    from resalign_fast.eval.report import rounded

    got = rounded(
        {"a": 0.07999999821186066, "b": [12.345678, 3], "c": {"d": 1e-7}, "e": "x", "f": True}
    )
    assert got == {"a": 0.08, "b": [12.35, 3], "c": {"d": 1e-7}, "e": "x", "f": True}
