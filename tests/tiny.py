"""Tiny model configs shared by tests (imported as `tiny`: `conftest` names clash across
folders)."""


def tiny_unet_config(**kw) -> dict:
    """A diffusers UNet2DConditionModel config small enough for second-order tests."""
    cfg = dict(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    cfg.update(kw)
    return cfg


def train_args(model_dir, ft_space, out, name: str = "r", *extra: str, **flags) -> list[str]:
    """Command line of a tiny `python -m resalign_fast.train` run on the CPU: no progress bar, no
    sample images, one configuration per step of batch 2 and one Richardson iteration unless
    `flags` (name=value, each becoming `--name value`) say otherwise; `extra` goes last."""
    settings = {
        "outer_steps": 1,
        "configs_per_step": 1,
        "batch_size": 2,
        "iters": 1,
        "samples_per_prompt": 0,
        "device": "cpu",
        **flags,
    }
    args = [
        "--pretrained_model_name_or_path",
        str(model_dir),
        "--ft_space",
        str(ft_space),
        "--output_dir",
        str(out),
        "--run_name",
        name,
        "--no-progress",
    ]
    for key, value in settings.items():
        args += [f"--{key}", str(value)]
    return args + list(extra)


def run_and_kill(module: str, args: list[str], watched, lines: int, timeout: float = 240.0) -> None:
    """Run `python -m <module> args` in a subprocess (one thread) and SIGKILL it as soon as the file
    `watched` has `lines` lines; asserts that it was killed, not finished or crashed."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    t0 = time.time()
    try:
        while proc.poll() is None and time.time() - t0 < timeout:
            if watched.is_file() and len(watched.read_text().splitlines()) >= lines:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and time.time() - t0 >= timeout:
            proc.kill()
        err = proc.communicate()[1].decode(errors="replace")
    assert proc.returncode == -signal.SIGKILL, f"not killed (rc {proc.returncode}):\n{err[-2000:]}"
