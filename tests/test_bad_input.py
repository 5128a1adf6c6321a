"""Bad input gets one clear message naming the file or key and a non-zero exit (or is skipped and
counted), and nothing written before is lost; NaN/inf is caught per nan_policy and never saved."""

import hashlib
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import train_args

from resalign_fast import train
from resalign_fast.data.sets import DataError, load_image_folder
from resalign_fast.models.pipeline import ModelError, load_model


def _folder(path, n=4, size=16, mode="L", seed=0):
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = ["file_name,text"]
    for i in range(n):
        arr = rng.integers(0, 256, (size, size) if mode == "L" else (size, size, 3), dtype=np.uint8)
        Image.fromarray(arr, mode).save(path / f"{i}.png")
        rows.append(f"{i}.png,a digit {i}")
    (path / "metadata.csv").write_text("\n".join(rows) + "\n")
    return path


def _args(model_dir, ft_space, out, data=None, *extra):
    a = train_args(model_dir, ft_space, out, checkpoint_every=1)
    if data is not None:
        a += ["--harmful_data", str(data), "--preserve_data", str(data), "--ft_data", str(data)]
    return a + list(extra)


def _snapshot(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# --- images and metadata
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mode, value, channels, want",
    [
        ("RGBA", (200, 10, 60, 7), 3, (200, 10, 60)),  # alpha dropped
        ("L", 77, 3, (77, 77, 77)),  # greyscale replicated
        ("P", None, 3, (30, 140, 250)),  # palette looked up
        ("I;16", 40000, 1, (round(40000 / 257),)),  # 16-bit scaled, not clipped
        (
            "RGB",
            (200, 10, 60),
            1,
            (round((200 * 299 + 10 * 587 + 60 * 114) / 1000),),
        ),  # ITU-R 601 luma
    ],
)
@pytest.mark.parametrize("size", [(20, 12), (5, 5), (40, 40)])
def test_modes_and_sizes_convert_to_closed_form(tmp_path, mode, value, channels, want, size):
    if mode == "P":
        im = Image.new("P", size, 3)
        im.putpalette([0, 0, 0] * 3 + [30, 140, 250] + [0, 0, 0] * 252)
    elif mode == "I;16":
        im = Image.fromarray(np.full(size[::-1], value, dtype=np.uint16))
        assert im.mode == "I;16"
    else:
        im = Image.new(mode, size, value)
    im.save(tmp_path / "x.png")
    (tmp_path / "metadata.csv").write_text("file_name,text\nx.png,a thing\n")
    s = load_image_folder(tmp_path, 16, channels)
    assert s.images.shape == (1, channels, 16, 16)
    expect = torch.tensor(want, dtype=torch.float32).view(-1, 1, 1) / 127.5 - 1
    assert (s.images[0] - expect).abs().max() <= 1 / 127.5 + 1e-6


def test_corrupt_missing_and_foreign_files_are_skipped_and_counted(tmp_path, caplog):
    _folder(tmp_path, n=2)
    good = (tmp_path / "0.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "junk.png").write_bytes(
        np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes()
    )
    (tmp_path / "notes.txt").write_text("hello")
    Image.fromarray(np.zeros((4, 4), np.float32), "F").save(tmp_path / "float.tiff")
    shutil.copy(tmp_path / "float.tiff", tmp_path / "float.png")
    extra = ["trunc.png,t", "junk.png,j", "missing.png,m", "notes.txt,n", "float.png,f"]
    (tmp_path / "metadata.csv").write_text(
        (tmp_path / "metadata.csv").read_text() + "\n".join(extra) + "\n"
    )
    with caplog.at_level(logging.WARNING):
        s = load_image_folder(tmp_path, 16, 1)
    assert len(s) == 2 and s.prompts == ["a digit 0", "a digit 1"]
    assert sorted(n for n, _ in s.skipped) == sorted(e.split(",")[0] for e in extra)
    assert "skipped 5 of 7" in caplog.text and "missing.png" in caplog.text


@pytest.mark.parametrize(
    "make, msg",
    [
        (lambda d: None, "not a directory"),
        (lambda d: _folder(d).joinpath("metadata.csv").unlink(), "metadata.csv: missing"),
        (
            lambda d: _folder(d).joinpath("metadata.csv").write_text("name,text\n0.png,a\n"),
            "no 'file_name' column",
        ),
        (
            lambda d: _folder(d).joinpath("metadata.csv").write_text("file_name,label\n0.png,a\n"),
            "no caption column",
        ),
        (lambda d: _folder(d).joinpath("metadata.csv").write_text("file_name,text\n"), "no rows"),
        (
            lambda d: (
                _folder(d).joinpath("metadata.csv").write_text("file_name,text\n0.png,a,extra\n")
            ),
            "metadata.csv:2: malformed",
        ),
        (
            lambda d: (
                _folder(d).joinpath("metadata.csv").write_bytes(b"file_name,text\n0.png,\xff\xfe\n")
            ),
            "not UTF-8",
        ),
        (
            lambda d: [p.write_bytes(b"x") for p in _folder(d).glob("*.png")],
            "no usable image among 4 rows",
        ),
    ],
)
def test_unusable_folder_is_one_error_naming_it(tmp_path, make, msg):
    d = tmp_path / "data"
    make(d)
    with pytest.raises(DataError, match="data") as e:
        load_image_folder(d, 16, 1)
    assert msg in str(e.value)


# --- configuration
# -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "toml, flags, msg",
    [
        ("bogus_key = 1\n", [], "unknown key(s) ['bogus_key']"),
        ("outer_steps = 'many'\n", [], "outer_steps: expected int"),
        ("lam = [\n", [], "not valid TOML"),
        ("", ["--batch_size", "0"], "batch_size: 0 is below the minimum 1"),
        ("", ["--nan_policy", "ignore"], None),  # argparse choices: exit status 2 via SystemExit
    ],
)
def test_bad_settings_name_the_key(
    tiny_model_dir, tiny_ft_space, tmp_path, capsys, toml, flags, msg
):
    cfg = tmp_path / "run.toml"
    cfg.write_text(toml)
    argv = _args(tiny_model_dir, tiny_ft_space, tmp_path / "out") + ["--config", str(cfg)] + flags
    if msg is None:
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        assert e.value.code == 2 and "nan_policy" in capsys.readouterr().err
        return
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_bad_ft_space_names_file_and_key(tiny_model_dir, tmp_path, capsys):
    space = tmp_path / "space.toml"
    space.write_text("[space]\nlr = [1e-3]\nsteps = [2]\nwarmup = [1]\n")
    assert train.main(_args(tiny_model_dir, space, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "space.toml" in err and "warmup" in err


# --- model paths and weight files
# ------------------------------------------------------------------------
def test_model_paths_and_pickled_weights(tiny_model_dir, tmp_path):
    with pytest.raises(ModelError, match="hub id.*local diffusers folder"):
        load_model("CompVis/stable-diffusion-v1-4")
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    shutil.rmtree(tmp_path / "m" / "unet")
    with pytest.raises(ModelError, match=r"not a diffusers pipeline folder \(missing unet/\)"):
        load_model(tmp_path / "m")
    # a folder with pickled .bin weights only: refused unless allowed
    ref = load_model(tiny_model_dir)
    ref.unet.save_pretrained(tmp_path / "m" / "unet", safe_serialization=False)
    assert not list((tmp_path / "m" / "unet").glob("*.safetensors"))
    with pytest.raises(ModelError, match="allow_pickle"):
        load_model(tmp_path / "m")
    ok = load_model(tmp_path / "m", allow_pickle=True)
    assert all(
        torch.equal(a, b)
        for a, b in zip(ok.unet.state_dict().values(), ref.unet.state_dict().values())
    )
    (tmp_path / "sd.ckpt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ModelError, match="pickled checkpoint.*allow_pickle"):
        load_model(tmp_path / "sd.ckpt")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(
        ModelError, match="odd.safetensors: could not load .* offline.*single_file_config"
    ):
        load_model(tmp_path / "odd.safetensors")


# --- nothing written before is lost
# -----------------------------------------------------------------------
def test_failed_runs_leave_an_existing_run_untouched(
    tiny_model_dir, tiny_ft_space, tmp_path, capsys
):
    data = _folder(tmp_path / "data", n=4)
    args = _args(tiny_model_dir, tiny_ft_space, tmp_path / "out", data)
    assert train.main(args) == 0
    run = tmp_path / "out" / "r"
    before = _snapshot(run)
    assert "checkpoints/last.pt" in before and "model/model_index.json" in before
    assert train.main(args) == 2 and "--resume" in capsys.readouterr().err  # no --resume: refused
    for p in data.glob("*.png"):
        p.write_bytes(b"corrupt")
    assert train.main(args + ["--resume"]) == 2
    assert "no usable image" in capsys.readouterr().err
    assert _snapshot(run) == before
    _folder(data, n=4)
    (run / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    before = _snapshot(run)
    assert train.main(args + ["--resume"]) == 2
    assert "last.pt: cannot read the checkpoint" in capsys.readouterr().err
    assert _snapshot(run) == before


# --- NaN / inf
# ---------------------------------------------------------------------------------------------
def _nan_at(step_calls, fn, make_nan):
    """Wrap fn so that its call number `step_calls` (0-based, one call per outer step here)
    returns NaN."""
    n = {"i": -1}

    def wrapped(*a, **k):
        n["i"] += 1
        out = fn(*a, **k)
        return make_nan(out) if n["i"] == step_calls else out

    return wrapped


def _theta_per_step(monkeypatch):
    """Record theta at every checkpoint (checkpoint_every 1)."""
    from resalign_fast import runs

    seen, real = {}, runs.checkpoint_save

    def save(ckpt_dir, algo, step):
        seen[step] = [p.detach().clone() for p in algo.theta]
        real(ckpt_dir, algo, step)

    monkeypatch.setattr(train, "checkpoint_save", save)
    return seen


# (function in bilevel, its call number in outer step 1 with k = 1, how to spoil its result)
# The loss injection spoils ga_loss, so these runs pass --harmful_loss ga (the digits default is
# esd).
SPOIL = {
    "loss": (
        "ga_loss",
        2,
        lambda loss: loss * float("nan"),
    ),  # two calls per step: at theta, at theta*
    "simulation": ("simulate_finetune", 1, lambda phi: [p * float("nan") for p in phi]),
    "hypergradient": ("stable_hypergrad", 1, lambda r: ([g * float("inf") for g in r[0]], *r[1:])),
    "hypergradient-reference": (
        "guarded_hypergrad",
        1,
        lambda r: ([g * float("inf") for g in r[0]], r[1]),
    ),
}


@pytest.mark.parametrize("where", sorted(SPOIL))
def test_nan_skip_policy_skips_the_step_and_logs_it(
    tiny_model_dir, tiny_ft_space, tmp_path, monkeypatch, caplog, where
):
    from resalign_fast import bilevel, unlearning

    name, call, spoil = SPOIL[where]
    module = unlearning if name == "ga_loss" else bilevel  # L_h lives with the step's objectives
    monkeypatch.setattr(module, name, _nan_at(call, getattr(module, name), spoil))
    seen = _theta_per_step(monkeypatch)
    guard = ["--guard", "reference"] if where.endswith("reference") else []
    args = _args(
        tiny_model_dir,
        tiny_ft_space,
        tmp_path,
        None,
        "--outer_steps",
        "3",
        "--lr",
        "1e-2",
        "--harmful_loss",
        "ga",
        *guard,
    )
    with caplog.at_level(logging.ERROR, logger="resalign_fast.bilevel"):
        assert train.main(args) == 0
    metrics = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped"] for m in metrics] == [False, True, False]
    assert "outer step 1" in caplog.text and metrics[1]["configs"][0] in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(seen[1], seen[2]))  # step 1 left theta as it was
    assert not all(torch.equal(a, b) for a, b in zip(seen[2], seen[3]))
    assert all(torch.isfinite(p).all() for s in seen.values() for p in s)


def test_nan_abort_policy_stops_with_finite_checkpoint(
    tiny_model_dir, tiny_ft_space, tmp_path, monkeypatch, capsys
):
    from resalign_fast import unlearning

    name, call, spoil = SPOIL["loss"]
    monkeypatch.setattr(unlearning, name, _nan_at(call, getattr(unlearning, name), spoil))
    args = _args(
        tiny_model_dir,
        tiny_ft_space,
        tmp_path,
        None,
        "--outer_steps",
        "3",
        "--nan_policy",
        "abort",
        "--harmful_loss",
        "ga",
    )
    assert train.main(args) == 3
    err = capsys.readouterr().err
    assert "outer step 1" in err and "non-finite" in err and "--resume" in err
    ck = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=True)
    assert ck["step"] == 1 and all(torch.isfinite(t).all() for t in ck["theta"])
    assert not (tmp_path / "r" / "model").exists()


def test_non_finite_theta_is_never_checkpointed(tmp_path):
    from resalign_fast.runs import RunError, checkpoint_save

    class Algo:
        theta = [torch.tensor([1.0, float("nan")])]
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1)

    with pytest.raises(RunError, match="NaN or inf"):
        checkpoint_save(tmp_path, Algo(), 3)
    assert not list(tmp_path.iterdir())


# --- prepare_data
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content, name, msg",
    [
        (None, "p.csv", "no such prompt file"),
        ("id,label\n1,x\n", "p.csv", "no prompt column one of ('prompt', 'text', 'caption')"),
        ("prompt\n\n \n", "p.csv", "no prompts"),
        (b"caf\xe9\n", "p.txt", "not UTF-8"),
    ],
)
def test_prepare_data_bad_prompts_one_message(tiny_model_dir, tmp_path, capsys, content, name, msg):
    from resalign_fast import prepare_data

    f = tmp_path / name
    if content is not None:
        f.write_bytes(content if isinstance(content, bytes) else content.encode())
    argv = [
        "--prompts",
        str(f),
        "--out",
        str(tmp_path / "out"),
        "--pretrained_model_name_or_path",
        str(tiny_model_dir),
    ]
    assert prepare_data.main(argv) == 2
    err = capsys.readouterr().err
    assert name in err and msg in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_prepare_data_keeps_existing_output_and_resumes_exactly(tiny_model_dir, tmp_path, capsys):
    from resalign_fast import prepare_data

    (tmp_path / "p.txt").write_text("a digit one\na digit two\na digit three\n")
    argv = [
        "--prompts",
        str(tmp_path / "p.txt"),
        "--out",
        str(tmp_path / "out"),
        "--pretrained_model_name_or_path",
        str(tiny_model_dir),
        "--steps",
        "2",
        "--guidance",
        "1",
        "--batch_size",
        "2",
        "--device",
        "cpu",
    ]
    assert prepare_data.main(argv) == 0
    before = _snapshot(tmp_path / "out")
    assert (
        prepare_data.main(argv) == 2 and "not empty" in capsys.readouterr().err
    )  # never overwritten
    assert _snapshot(tmp_path / "out") == before
    assert (
        prepare_data.main(argv + ["--resume", "--seed", "1"]) == 2
        and "seed" in capsys.readouterr().err
    )
    (tmp_path / "out" / "000002.png").unlink()  # as if killed during the second batch
    assert prepare_data.main(argv + ["--resume"]) == 0
    assert "(1 images generated)" in capsys.readouterr().out
    assert _snapshot(tmp_path / "out") == before  # the regenerated image is bit-identical
    s = load_image_folder(tmp_path / "out", 16, 1)
    assert s.prompts == ["a digit one", "a digit two", "a digit three"] and not s.skipped
