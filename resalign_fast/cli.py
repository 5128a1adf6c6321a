"""Command lines from config dataclasses: one flag per field, defaults < --config TOML < flags."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

from resalign_fast.config import ConfigError, ResAlignConfig, from_dict, load_toml

T = TypeVar("T")


def build_parser(
    cls=ResAlignConfig, description: str = "", prog: str | None = None
) -> argparse.ArgumentParser:
    """An argparse parser with one flag per dataclass field (defaults are None: only given flags
    override).

    The description keeps its line breaks (examples stay one per line); choice flags show their
    choices; prog is `python -m resalign_fast.<module>` when run as a module of this package.
    A field's `aliases` are further names of its flag.
    """
    if prog is None:
        a0 = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
        if a0 is not None and a0.suffix == ".py" and a0.parent == Path(__file__).resolve().parent:
            prog = f"python -m resalign_fast.{a0.stem}"
    p = argparse.ArgumentParser(
        description=description, prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config", type=str, default=None, help="TOML file of settings (flags override it)"
    )
    for f in fields(cls):
        m, t = f.metadata, (f.type if isinstance(f.type, str) else f.type.__name__)
        h = f"{m.get('help', '')} (default: {f.default})"
        aliases = list(m.get("aliases", ()))
        if aliases:
            h += f"; also {', '.join(aliases)}"
        h = h.replace("%", "%%")  # argparse formats help strings with %
        if t == "bool":
            p.add_argument(
                f"--{f.name}",
                *aliases,
                dest=f.name,
                default=None,
                action=argparse.BooleanOptionalAction,
                help=h,
            )
        else:
            p.add_argument(
                f"--{f.name}",
                *aliases,
                dest=f.name,
                default=None,
                help=h,
                metavar=None if m.get("choices") else t.upper(),
                choices=m.get("choices"),
            )
    return p


def parse_dataclass(
    cls: type[T],
    argv: list[str] | None = None,
    description: str = "",
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
    prog: str | None = None,
) -> tuple[T, argparse.Namespace]:
    """Defaults < --config TOML < flags for `cls` (one flag per field), plus any `extra` arguments.

    Returns:
        (the validated config, the argparse namespace; extra arguments are read from it).
    """
    p = build_parser(cls, description, prog)
    if extra is not None:
        extra(p)
    ns = p.parse_args(argv)
    names = {f.name for f in fields(cls)}
    cfg = from_dict(load_toml(ns.config), source=ns.config, cls=cls) if ns.config else cls()
    flags = {k: v for k, v in vars(ns).items() if k in names and v is not None}
    return from_dict(flags, base=cfg, source="command line"), ns


def parse_config(
    argv: list[str] | None = None, description: str = "", prog: str | None = None
) -> ResAlignConfig:
    """`parse_dataclass` for train's ResAlignConfig (prog: the command shown in usage lines)."""
    return parse_dataclass(ResAlignConfig, argv, description, prog=prog)[0]


def parse_list(text: str, kind: Callable[[str], Any], name: str) -> list:
    """A comma-separated flag value ("50,100,200") as a list; empty text gives []."""
    try:
        return [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(
            f"{name}: expected a comma-separated list of {kind.__name__}, got {text!r}"
        ) from None
