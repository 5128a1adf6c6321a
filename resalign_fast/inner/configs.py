"""pi(C): the distribution of simulated downstream fine-tuning configurations, read from a TOML
file.

A file has either a `[space]` table of lists (each sampled configuration draws one value from every
list, uniformly and independently) or an explicit `[[configs]]` array (sampled uniformly), plus an
optional `[fixed]` table of values shared by all configurations. See `configs/reference.toml`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from resalign_fast.config import CONFIG_DIR, ConfigError, load_toml

CHOICES = {
    "loss": ("standard", "dreambooth"),
    "algorithm": ("full", "lora"),
    "optimizer": ("sgd", "adam", "adamw"),
}


@dataclass(frozen=True)
class FTConfig:
    """One downstream fine-tuning configuration C.

    Attributes:
        lr: learning rate. steps: optimizer steps. loss: "standard" denoising or "dreambooth"
        (instance loss + prior_weight x prior loss on class data). algorithm: "full" (every UNet
        weight) or "lora". optimizer: "sgd", "adam" or "adamw". batch_size: images per step.
    """

    lr: float = 1e-5
    steps: int = 10
    loss: str = "standard"
    algorithm: str = "full"
    optimizer: str = "adam"
    batch_size: int = 1
    prior_weight: float = 1.0
    momentum: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        for k, allowed in CHOICES.items():
            if getattr(self, k) not in allowed:
                raise ConfigError(
                    f"fine-tuning config: {k} = {getattr(self, k)!r} is not one of {allowed}"
                )
        if not (
            self.lr > 0 and self.steps >= 1 and self.batch_size >= 1 and self.prior_weight >= 0
        ):
            raise ConfigError(f"fine-tuning config: out-of-range value in {self}")

    def short(self) -> str:
        return f"{self.algorithm}/{self.optimizer}/{self.loss}/lr{self.lr:g}/{self.steps}st"


def _make(d: dict, source: str) -> FTConfig:
    known = {f.name for f in fields(FTConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown fine-tuning key(s) {unknown}")
    try:
        return FTConfig(**d)
    except TypeError as e:
        raise ConfigError(f"{source}: {e}") from None


@dataclass(frozen=True)
class FTSpace:
    """A finite list of configurations sampled uniformly."""

    configs: tuple[FTConfig, ...]
    source: str = ""

    def sample(self, k: int, generator: torch.Generator) -> list[FTConfig]:
        """k configurations drawn uniformly with replacement."""
        idx = torch.randint(0, len(self.configs), (k,), generator=generator)
        return [self.configs[int(i)] for i in idx]

    def with_overrides(self, **kw) -> FTSpace:
        return FTSpace(tuple(replace(c, **kw) for c in self.configs), self.source)


def load_ft_space(name_or_path: str) -> FTSpace:
    """Load pi(C) from a shipped name ("digits", "reference") or a TOML path."""
    p = Path(name_or_path)
    if not p.suffix:
        p = CONFIG_DIR / f"{name_or_path}.toml"
        if not p.is_file():
            shipped = sorted(q.stem for q in CONFIG_DIR.glob("*.toml"))
            raise ConfigError(
                f"ft_space: unknown name {name_or_path!r}; shipped: {shipped}, or give a .toml path"
            )
    d = load_toml(p)
    unknown = sorted(set(d) - {"space", "fixed", "configs"})
    if unknown:
        raise ConfigError(
            f"{p}: unknown table(s) {unknown}; expected [space], [fixed] or [[configs]]"
        )
    fixed = d.get("fixed", {})
    if ("space" in d) == ("configs" in d):
        raise ConfigError(f"{p}: give exactly one of [space] or [[configs]]")
    if "space" in d:
        space = d["space"]
        if not all(isinstance(v, list) and v for v in space.values()):
            raise ConfigError(f"{p}: every [space] entry must be a non-empty list")
        keys = sorted(space)
        items = [
            dict(zip(keys, vals), **fixed) for vals in itertools.product(*(space[k] for k in keys))
        ]
    else:
        items = [dict(fixed, **c) for c in d["configs"]]
    if not items:
        raise ConfigError(f"{p}: no configurations")
    return FTSpace(tuple(_make(c, str(p)) for c in items), str(p))
