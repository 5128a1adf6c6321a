"""`python -m resalign_fast.finetune --deepspeed ds_config.json` (ZeRO 2, with and without CPU
offload) on the CPU: the same weights as the plain fine-tuning run. Skips when deepspeed is not
importable.

Marked `deepspeed`: select with `-m deepspeed`. The first use JIT-builds DeepSpeed's shm comm op
(about 60-100 s on 2 cores); TORCH_EXTENSIONS_DIR (default here:
~/.cache/resalign_fast/torch_extensions)
keeps it for later runs, after which this file takes about 40 s.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from resalign_fast.config import ConfigError
from resalign_fast.eval.deepspeed_ft import load_ds_config
from resalign_fast.eval.downstream import FinetuneConfig

ROOT = Path(__file__).resolve().parents[1]
HAVE_DS = importlib.util.find_spec("deepspeed") is not None
EXT_DIR = os.environ.get("TORCH_EXTENSIONS_DIR") or str(
    Path.home() / ".cache" / "resalign_fast" / "torch_extensions"
)
UNET = "model/unet/diffusion_pytorch_model.safetensors"


def _args(model_dir, out):
    return [
        "--pretrained_model_name_or_path",
        str(model_dir),
        "--train_data",
        "benign",
        "--max_train_steps",
        "3",
        "--learning_rate",
        "1e-3",
        "--train_batch_size",
        "2",
        "--device",
        "cpu",
        "--output_dir",
        str(out),
    ]


@pytest.mark.deepspeed
@pytest.mark.skipif(
    not HAVE_DS, reason="deepspeed is not importable (DS_BUILD_OPS=0 pip install deepspeed)"
)
def test_zero2_matches_plain_finetune(tiny_model_dir, tmp_path):
    from resalign_fast import finetune

    ds = json.loads((ROOT / "examples" / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=EXT_DIR)
    runs = {}
    for name, offload in (("offload", True), ("gpu_states", False)):
        cfg = json.loads(json.dumps(ds))
        if not offload:
            cfg["zero_optimization"].pop("offload_optimizer")
        (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
        runs[name] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "resalign_fast.finetune",
                *_args(tiny_model_dir, tmp_path / name),
                "--deepspeed",
                str(tmp_path / f"{name}.json"),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        if name == "offload":
            out, err = runs[name].communicate(
                timeout=240
            )  # the first one may JIT-build the op; then run the rest
            assert runs[name].returncode == 0, err[-3000:]
    assert finetune.main(_args(tiny_model_dir, tmp_path / "plain")) == 0
    out, err = runs["gpu_states"].communicate(timeout=240)
    assert runs["gpu_states"].returncode == 0, err[-3000:]

    base = load_file(str(tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    plain = load_file(str(tmp_path / "plain" / UNET))
    moved = max((plain[k] - base[k]).abs().max().item() for k in base)
    assert moved > 1e-4
    for name in runs:
        got = load_file(str(tmp_path / name / UNET))
        err = max((got[k] - plain[k]).abs().max().item() for k in plain)
        assert err < 1e-3 * moved, (
            name,
            err,
            moved,
        )  # fp32; only the clipping-norm sum order differs
        log = [json.loads(x) for x in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        ref = [json.loads(x) for x in (tmp_path / "plain" / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == [1, 2, 3]
        assert all(abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]) for a, b in zip(log, ref))
        assert (
            json.loads((tmp_path / name / "ds_config.json").read_text())[
                "train_micro_batch_size_per_gpu"
            ]
            == 2
        )


def _write(tmp_path, obj) -> Path:
    p = tmp_path / "ds.json"
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def test_ds_config_is_completed_from_the_flags(tmp_path):
    cfg = FinetuneConfig(train_batch_size=3, max_grad_norm=0.5)
    ds = load_ds_config(
        _write(tmp_path, {"zero_optimization": {"stage": 2}, "gradient_clipping": "auto"}), cfg
    )
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_clipping"] == 0.5
    assert ds["gradient_accumulation_steps"] == 1 and ds["zero_force_ds_cpu_optimizer"] is False


@pytest.mark.parametrize(
    "obj, msg",
    [
        ("{not json", "not valid JSON"),
        ({"optimizer": {"type": "Adam"}}, "'optimizer' section"),
        ({"zero_optimization": {"stage": 3}}, "stage = 3"),
        (
            {"train_micro_batch_size_per_gpu": 4},
            "train_micro_batch_size_per_gpu = 4 disagrees with --train_batch_size",
        ),
        ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps"),
    ],
)
def test_bad_ds_config_names_file_and_key(tmp_path, obj, msg):
    p = _write(tmp_path, obj)
    with pytest.raises(ConfigError, match="ds.json") as e:
        load_ds_config(p, FinetuneConfig())
    assert msg in str(e.value)


def test_missing_ds_config_is_one_message(tiny_model_dir, tmp_path, capsys):
    from resalign_fast import finetune

    assert (
        finetune.main(
            _args(tiny_model_dir, tmp_path / "o") + ["--deepspeed", str(tmp_path / "nope.json")]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert (
        "nope.json: no such DeepSpeed config file" in err or "needs DeepSpeed" in err
    ) and "Traceback" not in err
    assert not (tmp_path / "o").exists()
