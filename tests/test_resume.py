"""--resume after a kill at any point ends with the same weights (bit for bit) as an uninterrupted
run (CPU, fixed seed, one thread): a real subprocess killed with SIGKILL, and kills injected inside
the checkpoint write and the export."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import run_and_kill, train_args

from resalign_fast import train

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


def _args(model_dir, ft_space, out, name, *extra):
    return train_args(
        model_dir,
        ft_space,
        out,
        name,
        *extra,
        outer_steps=STEPS,
        checkpoint_every=2,
        configs_per_step=2,
        iters=2,
        lr="1e-2",
    )


def _final(run: Path):
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    unet = load_file(str(run / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        m.pop("seconds"), m.pop("peak_memory_bytes")
    return ck, unet, metrics


def _assert_same(a, b):
    (ck_a, unet_a, met_a), (ck_b, unet_b, met_b) = a, b
    assert ck_a["step"] == ck_b["step"] == STEPS
    assert all(torch.equal(x, y) for x, y in zip(ck_a["theta"], ck_b["theta"]))
    sa, sb = ck_a["opt"]["state"], ck_b["opt"]["state"]
    assert sa.keys() == sb.keys() and all(
        torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i]
    )
    assert unet_a.keys() == unet_b.keys() and all(torch.equal(unet_a[k], unet_b[k]) for k in unet_a)
    assert met_a == met_b and [m["step"] for m in met_a] == list(range(STEPS))


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tiny_ft_space, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    n = torch.get_num_threads()
    torch.set_num_threads(
        1
    )  # module fixtures run before the per-test one-thread fixture; results depend on it
    try:
        assert train.main(_args(tiny_model_dir, tiny_ft_space, out, "ref")) == 0
    finally:
        torch.set_num_threads(n)
    return _final(out / "ref")


def _kill_when(args, metrics: Path, lines: int, timeout: float = 120.0) -> None:
    run_and_kill("resalign_fast.train", args, metrics, lines, timeout)


def test_sigkill_subprocess_then_resume_matches_uninterrupted(
    reference, tiny_model_dir, tiny_ft_space, tmp_path
):
    args = _args(tiny_model_dir, tiny_ft_space, tmp_path, "run")
    metrics = tmp_path / "run" / "metrics.jsonl"
    _kill_when(args, metrics, 1)  # before the first checkpoint (step 2)
    _kill_when(args + ["--resume"], metrics, 3)  # after the checkpoint of step 2, inside step 3
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["step"] == 2
    assert train.main(args + ["--resume"]) == 0
    _assert_same(_final(tmp_path / "run"), reference)


class _Killed(BaseException):
    """Stands for SIGKILL: nothing in the program catches it."""


def test_kill_inside_checkpoint_write_and_export(
    reference, tiny_model_dir, tiny_ft_space, tmp_path, monkeypatch
):
    from resalign_fast import export, runs

    args = _args(tiny_model_dir, tiny_ft_space, tmp_path, "run")
    real_save, real_export = runs.checkpoint_save, export.export_run

    def save_then_die(ckpt_dir, algo, step):
        if step == STEPS:  # the .tmp is written, the rename never happens
            real_save(ckpt_dir / "scratch", algo, step)
            (ckpt_dir / "scratch" / runs.CKPT).replace(ckpt_dir / (runs.CKPT + ".tmp"))
            raise _Killed()
        real_save(ckpt_dir, algo, step)

    monkeypatch.setattr(train, "checkpoint_save", save_then_die)
    with pytest.raises(_Killed):
        train.main(args)
    assert torch.load(tmp_path / "run" / "checkpoints" / runs.CKPT, weights_only=True)["step"] == 2
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == STEPS

    def export_then_die(out, cfg, model, algo):
        real_export(out, cfg, model, algo)
        (out / "model" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(
            b"half written"
        )
        raise _Killed()

    monkeypatch.setattr(train, "checkpoint_save", real_save)
    monkeypatch.setattr(train, "export_run", export_then_die)
    with pytest.raises(_Killed):
        train.main(args + ["--resume"])
    monkeypatch.setattr(train, "export_run", real_export)
    assert train.main(args + ["--resume"]) == 0  # nothing left to train: export again
    _assert_same(_final(tmp_path / "run"), reference)


def test_resume_refuses_changed_settings(
    reference, tiny_model_dir, tiny_ft_space, tmp_path, capsys
):
    args = _args(tiny_model_dir, tiny_ft_space, tmp_path, "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.toml").write_text("lam = 0.5\nseed = 0\n")
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert train.main(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "lam" in err and "config.toml" in err
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before
