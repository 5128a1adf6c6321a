"""`python -m resalign_fast.train` end to end on a tiny model (2 outer steps), and its input
errors."""

import json

import pytest
import torch

from resalign_fast.train import main


def _args(tiny_model_dir, tiny_ft_space, tmp_path, *extra):
    return [
        "--pretrained_model_name_or_path",
        str(tiny_model_dir),
        "--ft_space",
        str(tiny_ft_space),
        "--output_dir",
        str(tmp_path),
        "--run_name",
        "r",
        "--outer_steps",
        "2",
        "--batch_size",
        "2",
        "--samples_per_prompt",
        "1",
        "--sample_steps",
        "2",
        "--no-progress",
        "--checkpoint_every",
        "1",
        *extra,
    ]


def test_two_outer_steps_write_every_output(tiny_model_dir, tiny_ft_space, tmp_path):
    assert main(_args(tiny_model_dir, tiny_ft_space, tmp_path, "--configs_per_step", "2")) == 0
    run = tmp_path / "r"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1]
    for m in lines:
        assert len(m["configs"]) == 2 and m["seconds"] > 0 and m["hypergrad_norm"] > 0
        assert {
            "harmful",
            "preserve",
            "recovered",
            "retries",
            "fallbacks",
            "peak_memory_bytes",
        } <= set(m)
    for f in (
        "config.toml",
        "samples_before.png",
        "samples_after.png",
        "model/unet/diffusion_pytorch_model.safetensors",
        "model/model_index.json",
        "lora/pytorch_lora_weights.safetensors",
        "checkpoints/last.pt",
    ):
        assert (run / f).is_file(), f
    # the exported UNet is the base with theta merged: it differs from the base model
    from safetensors.torch import load_file

    base = load_file(str(tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    new = load_file(str(run / "model/unet/diffusion_pytorch_model.safetensors"))
    assert base.keys() == new.keys()
    changed = [k for k in base if not torch.equal(base[k], new[k])]
    assert changed and all(any(t in k for t in ("to_q", "to_k", "to_v", "to_out")) for k in changed)
    assert "outer_steps = 2" in (run / "config.toml").read_text()


def test_existing_run_needs_resume(tiny_model_dir, tiny_ft_space, tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "keep.txt").write_text("data")
    assert main(_args(tiny_model_dir, tiny_ft_space, tmp_path)) == 2
    assert "--resume" in capsys.readouterr().err
    assert (tmp_path / "r" / "keep.txt").read_text() == "data"


@pytest.mark.parametrize(
    "flags, msg",
    [
        (["--pretrained_model_name_or_path", "CompVis/stable-diffusion-v1-4"], "hub id"),
        (["--pretrained_model_name_or_path", "/nonexistent/sd"], "no such model"),
        (["--ft_space", "nope"], "unknown name"),
        (["--lam", "2"], "lam"),
    ],
)
def test_bad_input_one_message_nonzero(tiny_model_dir, tiny_ft_space, tmp_path, capsys, flags, msg):
    assert main(_args(tiny_model_dir, tiny_ft_space, tmp_path) + flags) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
