"""`python -m resalign_fast.info`: versions, how the native extension was built, and which backend
of every fused op can run here (or why not).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import pkgutil
import platform
import sys

import torch

import resalign_fast
from resalign_fast import ops
from resalign_fast.ops import backends, registry


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def load_all_ops() -> dict[str, str]:
    """Imports every module of resalign_fast.ops (each registers its ops).

    Returns:
        module name -> import error, for the modules that failed to import.
    """
    failed = {}
    for mod in pkgutil.iter_modules(ops.__path__):
        if not mod.name.startswith("_") and mod.name not in ("registry", "backends"):
            try:
                importlib.import_module(f"resalign_fast.ops.{mod.name}")
            except Exception as exc:  # noqa: BLE001 - reported in the table, not hidden
                failed[mod.name] = f"{type(exc).__name__}: {exc}"
    return failed


def versions() -> dict[str, str]:
    """Versions of Python, the platform, torch and the optional packages."""
    cuda = torch.version.cuda or "none (CPU build)"
    devices = (
        ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none"
    )
    return {
        "resalign_fast": resalign_fast.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": f"{torch.__version__} (CUDA {cuda}; CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()})",
        "cuda devices": devices,
        "triton": _version("triton"),
        "xformers": _version("xformers"),
        "diffusers": _version("diffusers"),
        "TRITON_INTERPRET": "on" if backends.interpreter_active() else "off",
    }


def build_info() -> dict[str, str]:
    """Build metadata of resalign_fast._C, or why it does not load."""
    ext, error = backends.extension()
    if ext is None:
        return {"extension": f"not loaded: {error}"}
    info = dict(ext.build_info())
    info["extension"] = f"loaded from {ext.__file__}"
    built, running = info.get("torch_version", ""), torch.__version__
    if built and built.split("+")[0] != running.split("+")[0]:
        info["WARNING"] = f"built against torch {built}, running {running}: rebuild"
    return info


def op_table() -> list[tuple[str, dict[str, str]]]:
    """(op, {backend: "available" or the reasons}) for every registered op; a module of
    resalign_fast.ops that fails to import gets a row of its own with the error."""
    failed = load_all_ops()
    rows = []
    for op in registry.registered_ops():
        rows.append(
            (
                op,
                {
                    b: "; ".join(r) if r else "available"
                    for b, r in registry.availability(op).items()
                },
            )
        )
    rows += [(f"{name} (module)", {"import": error}) for name, error in failed.items()]
    return rows


def _aligned(pairs: dict[str, str]) -> list[str]:
    width = max((len(k) for k in pairs), default=0)
    return [f"  {k:<{width}}  {v}" for k, v in pairs.items()]


def format_table(rows: list[tuple[str, dict[str, str]]]) -> list[str]:
    """Op x backend table: "available" or "no [i]", the reasons listed once below it as [i]."""
    backends = list(dict.fromkeys(b for _, cells in rows for b in cells))
    notes: list[str] = []
    grid = [["op"] + backends]
    for op, cells in rows:
        line = [op]
        for b in backends:
            cell = cells.get(b, "-")
            if cell not in ("available", "-"):
                if cell not in notes:
                    notes.append(cell)
                cell = f"no [{notes.index(cell) + 1}]"
            line.append(cell)
        grid.append(line)
    widths = [max(len(r[i]) for r in grid) for i in range(len(grid[0]))]
    out = ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in grid]
    return out + [f"  [{i}] {note}" for i, note in enumerate(notes, 1)]


def format_report() -> str:
    """The whole report as text."""
    lines = ["== versions", *_aligned(versions())]
    lines += [
        "",
        "== native extension resalign_fast._C",
        *_aligned(dict(sorted(build_info().items()))),
    ]
    lines += [
        "",
        "== ops x backends (auto: the first available from the left)",
        *format_table(op_table()),
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m resalign_fast.info", description=__doc__)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    parse_args(argv)
    print(format_report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
