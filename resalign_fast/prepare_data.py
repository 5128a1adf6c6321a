"""Build an image set from a prompt list with the base model:
`python -m resalign_fast.prepare_data --prompts harmful.csv --out data/harmful`.

The paper built its D_harmful (150 prompts), D_preserve (140) and D_FT (100) this way: images that
the base model itself generates for each prompt. The output is an image folder that
`--harmful_data` / `--preserve_data` / `--ft_data` take: `000000.png, ...` and `metadata.csv`
(`file_name,text`). The image size is the model's (its UNet sample size x the VAE's scale: 16 px
greyscale for the digits model, 512 px RGB for SD v1.x); there is no size flag.

Prompt files: `.csv` with a header and a prompt column (`prompt`, `text` or `caption`, or
`--prompt_column`), or a text file with one prompt per line. Blank prompts are skipped; their count
is printed (a warning, and the final `done:` line).

Robustness: an existing non-empty `--out` is never overwritten; `--resume` continues a killed run
(same settings required; finished batches are kept, image j's noise depends only on the seed and j's
batch), and metadata.csv is rewritten atomically after every batch, so a killed run leaves a usable
folder. Exit status 2 with one message on bad input.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
from pathlib import Path

import torch

log = logging.getLogger("resalign_fast.prepare_data")
PROMPT_COLUMNS = ("prompt", "text", "caption")
SETTINGS_FILE = "prepare_config.json"


class PrepareError(ValueError):
    """Bad prompt file, output folder or settings; the message names the file."""


def read_prompts(path: str | Path, column: str | None = None) -> tuple[list[str], int]:
    """Prompts of a .csv (header + prompt column) or a text file (one per line).

    Returns:
        (prompts, number of blank entries skipped).

    Raises:
        PrepareError: missing or unreadable file, no prompt column, no prompt at all.
    """
    p = Path(path)
    if not p.is_file():
        raise PrepareError(f"{p}: no such prompt file")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise PrepareError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if p.suffix.lower() == ".csv":
        try:
            reader = csv.DictReader(io.StringIO(text, newline=""))
            cols = reader.fieldnames or []
            col = column or next((c for c in PROMPT_COLUMNS if c in cols), None)
            if col is None or col not in cols:
                want = repr(column) if column else f"one of {PROMPT_COLUMNS}"
                raise PrepareError(f"{p}: no prompt column {want} (columns: {cols})")
            raw = [row.get(col) for row in reader]
        except csv.Error as e:
            raise PrepareError(f"{p}: malformed CSV: {e}") from None
    else:
        raw = text.splitlines()
    prompts = [r.strip() for r in raw if r is not None and r.strip()]
    skipped = len(raw) - len(prompts)
    if not prompts:
        raise PrepareError(f"{p}: no prompts ({skipped} blank entries)")
    return prompts, skipped


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m resalign_fast.prepare_data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--prompts",
        required=True,
        help="prompt list: .csv with a prompt column, or one prompt per line",
    )
    ap.add_argument(
        "--out", required=True, help="output image folder (must be new or empty, unless --resume)"
    )
    ap.add_argument(
        "--pretrained_model_name_or_path",
        default="digits",
        help="base model: 'digits', a local diffusers folder or a single .safetensors file",
    )
    ap.add_argument(
        "--prompt_column",
        default=None,
        help=f"CSV column of the prompts (default: first of {PROMPT_COLUMNS})",
    )
    ap.add_argument("--images_per_prompt", type=int, default=1, help="images generated per prompt")
    ap.add_argument("--steps", type=int, default=30, help="DDIM sampling steps (paper: 30)")
    ap.add_argument(
        "--guidance", type=float, default=7.5, help="classifier-free guidance scale (SD: 7.5)"
    )
    ap.add_argument("--seed", type=int, default=0, help="generation seed")
    ap.add_argument("--batch_size", type=int, default=8, help="images per generation batch")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument(
        "--frozen_dtype",
        default="fp32",
        choices=("fp32", "bf16", "fp16"),
        help="dtype of the VAE and text encoder (bf16/fp16 save GPU memory)",
    )
    ap.add_argument(
        "--allow_pickle", action="store_true", help="also read pickled (.bin/.ckpt) weights"
    )
    ap.add_argument(
        "--single_file_config",
        default=None,
        help="local diffusers folder with the component configs of a single-file checkpoint",
    )
    ap.add_argument(
        "--resume", action="store_true", help="continue a killed run into the same --out"
    )
    return ap


def _settings(ns: argparse.Namespace, prompts: list[str]) -> dict:
    keys = (
        "pretrained_model_name_or_path",
        "images_per_prompt",
        "steps",
        "guidance",
        "seed",
        "batch_size",
        "frozen_dtype",
    )
    return dict({k: getattr(ns, k) for k in keys}, prompts=prompts)


def _check_out(out: Path, settings: dict, resume: bool) -> None:
    if not out.exists() or not any(out.iterdir()):
        return
    if not resume:
        raise PrepareError(
            f"{out} exists and is not empty: choose a new --out, or --resume a killed run"
        )
    saved_path = out / SETTINGS_FILE
    try:
        saved = json.loads(saved_path.read_text())
    except (OSError, ValueError):
        raise PrepareError(
            f"--resume: {saved_path} missing or unreadable: {out} was not written by prepare_data"
        ) from None
    diff = sorted(k for k in settings if saved.get(k) != settings[k])
    if diff:
        raise PrepareError(
            f"--resume: {saved_path} was written with other settings ({diff}); resume with the "
            f"same ones"
        )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _metadata(rows: list[tuple[str, str]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["file_name", "text"])
    w.writerows(rows)
    return buf.getvalue()


def _save_image(img: torch.Tensor, path: Path) -> None:
    """(C, H, W) in [-1, 1] -> PNG (greyscale for C = 1), written atomically."""
    from PIL import Image

    arr = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(tmp)
    tmp.replace(path)


def check_numbers(ns: argparse.Namespace) -> None:
    """Range checks of the numeric flags, before anything is written; NaN/inf are refused
    (`nan < 0` is False, and guidance NaN made every image black)."""
    import math

    for k in ("images_per_prompt", "steps", "batch_size"):
        if getattr(ns, k) < 1:
            raise PrepareError(f"--{k}: {getattr(ns, k)} is below the minimum 1")
    if not math.isfinite(ns.guidance):
        raise PrepareError(f"--guidance: {ns.guidance} is not a finite number")
    if ns.guidance < 0:
        raise PrepareError(f"--guidance: {ns.guidance} is below the minimum 0")


def prepare(ns: argparse.Namespace) -> tuple[Path, int]:
    """Generate the image set described by parsed flags `ns`; returns (out folder, images written
    now)."""
    from resalign_fast.models.pipeline import load_model
    from resalign_fast.models.sampling import generate
    from resalign_fast.runs import pick_device

    check_numbers(ns)
    prompts, blank = read_prompts(ns.prompts, ns.prompt_column)
    if blank:
        log.warning("%s: skipped %d blank prompt(s)", ns.prompts, blank)
    ns.blank_prompts = blank
    out = Path(ns.out)
    if out.exists() and not out.is_dir():
        raise PrepareError(f"--out {out}: exists and is not a folder")
    settings = _settings(ns, prompts)
    _check_out(out, settings, ns.resume)
    model = load_model(
        ns.pretrained_model_name_or_path,
        device=pick_device(ns.device),
        frozen_dtype=ns.frozen_dtype,
        allow_pickle=ns.allow_pickle,
        single_file_config=ns.single_file_config,
    )
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / SETTINGS_FILE, json.dumps(settings, indent=1))
    items = [p for p in prompts for _ in range(ns.images_per_prompt)]
    names = [f"{j:06d}.png" for j in range(len(items))]
    written = 0
    for lo in range(0, len(items), ns.batch_size):
        hi = min(lo + ns.batch_size, len(items))
        if not all((out / n).is_file() for n in names[lo:hi]):
            # seed per batch: a resumed run regenerates exactly the missing batches
            imgs = generate(
                model,
                items[lo:hi],
                steps=ns.steps,
                guidance=ns.guidance,
                seed=ns.seed * 1_000_003 + lo,
                batch_size=ns.batch_size,
            )
            for n, im in zip(names[lo:hi], imgs):
                _save_image(im, out / n)
            written += hi - lo
        _write_atomic(out / "metadata.csv", _metadata(list(zip(names[:hi], items[:hi]))))
        log.info("%d/%d images", hi, len(items))
    return out, written


def main(argv: list[str] | None = None) -> int:
    """Entry point; exit status 0 done, 2 bad input (one message on stderr)."""
    from resalign_fast.models.pipeline import ModelError
    from resalign_fast.runs import RunError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ns = build_parser().parse_args(argv)
    try:
        out, n = prepare(ns)
    except (PrepareError, ModelError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    blank = getattr(ns, "blank_prompts", 0)
    print(
        f"done: {out} ({n} images generated"
        + (f"; {blank} blank prompt(s) skipped)" if blank else ")")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
