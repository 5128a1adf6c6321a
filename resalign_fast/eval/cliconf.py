"""Settings for any dataclass built with `config._f`: defaults < `--config file.toml` < flags.

The generic twin of `config.from_dict` / `config.parse_config` (which are bound to ResAlignConfig),
used by `finetune` and `evaluate`. Unknown keys and out-of-range values are errors naming the key.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Optional, TypeVar

from resalign_fast.config import ConfigError, _coerce, build_parser, load_toml, validate_fields

T = TypeVar("T")


def config_from_dict(cls: type[T], d: dict, base: Optional[T] = None, source: str = "config") -> T:
    """Override `base` (default: cls()) with the keys of `d`, coerced to the field types and validated.

    Raises:
        ConfigError: an unknown key, a value of the wrong type, or one outside the field's choices/range.
    """
    base = base if base is not None else cls()
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}")
    return validate_fields(dataclasses.replace(base, **{k: _coerce(known[k], v) for k, v in d.items()}))


def parse_dataclass(cls: type[T], argv: Optional[list[str]] = None, description: str = "",
                    extra: Optional[Callable[[argparse.ArgumentParser], None]] = None, prog: Optional[str] = None
                    ) -> tuple[T, argparse.Namespace]:
    """Parse flags for `cls` (one per field, as `config.build_parser`), plus any `extra` arguments.

    Returns:
        (the validated config, the argparse namespace; extra arguments are read from it).
    """
    p = build_parser(cls, description, prog)
    if extra is not None:
        extra(p)
    ns = p.parse_args(argv)
    names = {f.name for f in dataclasses.fields(cls)}
    cfg = config_from_dict(cls, load_toml(ns.config), source=ns.config) if ns.config else cls()
    flags = {k: v for k, v in vars(ns).items() if k in names and v is not None}
    return config_from_dict(cls, flags, base=cfg, source="command line"), ns


def parse_list(text: str, kind: Callable[[str], Any], name: str) -> list:
    """A comma-separated flag value ("50,100,200") as a list; empty text gives []."""
    try:
        return [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{name}: expected a comma-separated list of {kind.__name__}, got {text!r}") from None


def dump_toml(cfg) -> str:
    """A flat dataclass as TOML, loadable with --config (strings escaped as TOML basic strings)."""
    import json

    lines = []
    for k, v in dataclasses.asdict(cfg).items():
        if isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, (int, float)):
            lines.append(f"{k} = {v!r}")
        else:
            lines.append(f"{k} = {json.dumps(str(v))}")
    return "\n".join(lines) + "\n"
