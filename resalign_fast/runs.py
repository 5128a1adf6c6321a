"""Run management shared by the entry points: device, data, sample grids, checkpoints, exit
status (the export is `resalign_fast.export`)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from resalign_fast.config import ConfigError, ResAlignConfig, load_toml, to_dict

log = logging.getLogger("resalign_fast.runs")
CKPT = "last.pt"
# Settings a resumed run may change: they do not affect the weights.
RESUME_MAY_CHANGE = {
    "resume",
    "progress",
    "device",
    "num_threads",
    "checkpoint_every",
    "nan_policy",
    "samples_per_prompt",
    "sample_steps",
    "guidance",
    "output_dir",
    "run_name",
}


class RunError(RuntimeError):
    """A run that cannot start or continue as asked; the message says why."""


class ModelDiverged(RuntimeError):
    """The trained model is numerically broken (non-finite or exploding); nothing was saved."""


def write_atomic(path: Path, text: str) -> None:
    """Write a text file so that a kill leaves either the old or the new content."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def save_atomic(obj, path: Path) -> None:
    """`torch.save(obj)` to path, flushed to disk before it replaces the old file: a kill leaves
    either the old checkpoint or the new one, never a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


@contextlib.contextmanager
def atomic_dir(final: Path):
    """Yield a temporary folder beside `final`; when the block ends without an exception it becomes
    `final` (replacing an older one) by rename, so a kill leaves either no `final` or a complete
    one.

    A killed writer leaves only `.<name>.tmp-<pid>` (never loadable as `final`); it is removed by
    the next write into the same parent.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in final.parent.glob(f".{final.name}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def lock_folder(folder: Path):
    """An exclusive lock on `folder` (created if needed) for as long as the returned file stays
    open:
    a second run into the same folder fails at once. The kernel drops the lock when the process
    ends, SIGKILL included, so a killed run never leaves a stale lock behind.

    Raises:
        RunError: another process holds the lock.
    """
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise RunError(
            f"{folder} is in use by another run (it holds {folder / '.lock'}); wait for it or "
            f"choose "
            f"another folder"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def folder_contents(folder: Path) -> list[str]:
    """Names in `folder` other than the lock file (empty when the folder does not exist)."""
    return sorted(p.name for p in folder.iterdir() if p.name != ".lock") if folder.is_dir() else []


def changed_settings(saved_path: Path, cfg, may_change: set[str]) -> list[str]:
    """The settings of `cfg` that differ from a run's saved config.toml, as "key: old -> new"
    (sorted by key), leaving out those in `may_change`; [] when there is no such file.

    Raises:
        ConfigError: the file cannot be read as TOML.
    """
    if not saved_path.is_file():
        return []  # killed before the run wrote anything: nothing to compare
    saved, now = load_toml(saved_path), to_dict(cfg)
    return [
        f"{k}: {saved[k]!r} -> {now[k]!r}"
        for k in sorted(set(saved) & set(now))
        if k not in may_change and saved[k] != now[k]
    ]


def check_resume_config(out: Path, cfg: ResAlignConfig) -> None:
    """--resume must continue the same run: settings that shape the weights may not change.

    Raises:
        RunError: config.toml of the run differs in such a setting (named), or cannot be read.
    """
    saved_path = out / "config.toml"
    try:
        changed = changed_settings(saved_path, cfg, RESUME_MAY_CHANGE)
    except ConfigError as e:
        raise RunError(f"--resume: {e}") from None
    if changed:
        changes = ", ".join(changed)
        raise RunError(
            f"--resume: {saved_path} was written with other settings ({changes}); "
            f"resume with the same settings or start another --run_name"
        )


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def load_data(cfg: ResAlignConfig, model, device: torch.device) -> dict:
    """Encoded D_harmful, D_preserve, D_FT (digits world unless folders are given), plus sample
    prompts."""
    from resalign_fast.data.digits import caption, digits_world
    from resalign_fast.data.encoded import encode_set
    from resalign_fast.data.sets import load_image_folder

    folders = {"harmful": cfg.harmful_data, "preserve": cfg.preserve_data, "ft": cfg.ft_data}
    given = [k for k, v in folders.items() if v]
    if given and len(given) != 3:
        raise RunError(
            f"give all three of --harmful_data, --preserve_data, --ft_data (got only {given})"
        )
    if given:
        sets = {
            k: load_image_folder(v, model.resolution, model.image_channels)
            for k, v in folders.items()
        }
        harm_prompts = list(dict.fromkeys(sets["harmful"].prompts))[:2]
        benign_prompts = list(dict.fromkeys(sets["preserve"].prompts))[:4]
    else:
        if model.resolution != 16 or model.image_channels != 1:
            raise RunError(
                f"the digits world needs the digits model (16x16 greyscale); {model.source} is "
                f"{model.resolution}px x {model.image_channels} channels: pass --harmful_data etc."
            )
        sets = digits_world(cfg.concept, model.resolution, cfg.seed)
        harm_prompts = [caption(cfg.concept, 0), caption(cfg.concept, 1)]
        benign_prompts = [
            caption(d, 0) for d in range(10) if d != cfg.concept
        ]  # every benign digit: drift shows
    cache = Path(cfg.output_dir) / ".cache" if model.vae is not None else None
    enc = {k: encode_set(model, s, device, cache) for k, s in sets.items()}
    enc["_sample_prompts"] = (harm_prompts, benign_prompts)
    return enc


def sample_grid(
    cfg: ResAlignConfig,
    model,
    harm: list[str],
    benign: list[str],
    path: Path,
    unet: torch.nn.Module | None = None,
) -> None:
    """One row per prompt (harmful rows first), samples_per_prompt images each, fixed seed."""
    from resalign_fast.models.sampling import generate, image_grid, save_png

    prompts = [p for p in harm + benign for _ in range(cfg.samples_per_prompt)]
    imgs = generate(
        model, prompts, steps=cfg.sample_steps, guidance=cfg.guidance, seed=cfg.seed, unet=unet
    )
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    save_png(
        image_grid(imgs, nrow=cfg.samples_per_prompt), tmp, scale=4 if model.vae is None else 1
    )
    tmp.replace(path)
    write_atomic(path.with_suffix(".txt"), "\n".join(harm + benign) + "\n")


def checkpoint_save(ckpt_dir: Path, algo, step: int) -> None:
    """Atomically write theta, the outer optimizer state and the step (write to .tmp, fsync,
    rename).

    Raises:
        RunError: theta holds NaN/inf (the previous checkpoint is kept).
    """
    if not all(torch.isfinite(p).all() for p in algo.theta):
        raise RunError(
            f"outer step {step}: theta holds NaN or inf, not checkpointed (the previous checkpoint "
            f"is kept)"
        )
    save_atomic(
        {
            "step": step,
            "theta": [p.detach().cpu() for p in algo.theta],
            "opt": algo.opt.state_dict(),
            "warm_vectors": getattr(algo, "warm_vectors", {}),
            "carry": getattr(algo, "carry", {}),
        },
        ckpt_dir / CKPT,
    )


def checkpoint_read(ckpt_dir: Path) -> dict | None:
    """The last checkpoint's contents (weights_only load), or None when there is none.

    Raises:
        RunError: the file exists but cannot be read as a checkpoint (named).
    """
    path = ckpt_dir / CKPT
    if not path.is_file():
        return None
    try:
        st = torch.load(path, weights_only=True, map_location="cpu")
        if not (isinstance(st, dict) and {"step", "theta", "opt"} <= set(st)):
            raise ValueError("missing step/theta/opt")
    except Exception as e:  # unreadable or not a weights-only file: say which
        raise RunError(
            f"{path}: cannot read the checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    return st


def checkpoint_load(ckpt_dir: Path, algo, state: dict | None = None) -> int:
    """Restore the last checkpoint (or `state`, from `checkpoint_read`) into `algo`; returns the
    next outer step (0 if none)."""
    path = ckpt_dir / CKPT
    st = state if state is not None else checkpoint_read(ckpt_dir)
    if st is None:
        log.warning("--resume: no checkpoint in %s, starting from step 0", ckpt_dir)
        return 0
    if len(st["theta"]) != len(algo.theta) or any(
        a.shape != b.shape for a, b in zip(st["theta"], algo.theta)
    ):
        raise RunError(f"{path}: checkpoint does not match this configuration (different theta)")
    with torch.no_grad():
        for p, v in zip(algo.theta, st["theta"]):
            p.copy_(v)
    algo.opt.load_state_dict(st["opt"])
    algo.warm_vectors = dict(
        st.get("warm_vectors", {})
    )  # the stable guard's warm starts: an exact resume
    algo.carry = dict(st.get("carry", {}))  # ft_carry's simulations in progress
    return int(st["step"])


def truncate_metrics(path: Path, steps: int) -> None:
    """Keep the first `steps` lines of metrics.jsonl (steps after the checkpoint are redone)."""
    if path.is_file():
        lines = path.read_text().splitlines(keepends=True)[:steps]
        write_atomic(path, "".join(lines))


def exit_status(
    body: Callable[[], Path | None],
    bad_input: tuple[type[BaseException], ...],
    numerical: tuple[type[BaseException], ...] = (),
) -> int:
    """Run an entry point's `body` and map its outcome to the exit status.

    Args:
        body: does the work; returns the output folder (None: print no `done:` line, e.g. rank > 0).
        bad_input, numerical: the exceptions meaning bad input (exit 2), a numerical failure (3).

    Returns:
        0 after printing `done: <folder>`; 3 or 2 after printing one `error:` line on stderr. Other
        exceptions (the SystemExit of --help) propagate.
    """
    try:
        out = body()
    except numerical as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except bad_input as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if out is not None:
        print(f"done: {out}")
    return 0
