"""Run configuration: frozen dataclasses, the only place defaults live; CLI flags are generated
from them (`resalign_fast.cli`).

One stack for every entry point's dataclass (train's `ResAlignConfig`, finetune's
`FinetuneConfig`, evaluate's `EvalConfig`): fields are declared with `setting`, values coerced
with `coerce` and checked with `validate`; `from_dict` and `cli.parse_dataclass` apply the
precedence dataclass defaults < `--config file.toml` < command-line flags. Unknown keys and
out-of-range values are errors that name the key.

Defaults follow the reference recipe of METHOD.md (lambda 0.8, K = 5, gamma = 1, alpha = 1,
max_grad_norm 0.2, 5 retries, k = 3, AdamW lr 2e-4 wd 1e-2, w_r 1.6 -> 2.0, rank-4 LoRA on
q/k/v/out), scaled for the digits world only where noted in the field's help ("digits:");
docs/configuration.md (scripts/gen_config_doc.py) gives the measurements behind them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names the key."""


def setting(
    default: Any,
    help: str,
    choices: tuple | None = None,
    lo: float | None = None,
    hi: float | None = None,
    aliases: tuple[str, ...] = (),
):
    """A dataclass field that is also a flag: `help` is its one-phrase --help text, `choices` or
    the range [lo, hi] what `validate` accepts, `aliases` further names of the flag."""
    return field(
        default=default,
        metadata={"help": help, "choices": choices, "lo": lo, "hi": hi, "aliases": aliases},
    )


def device_setting():
    """The `device` field every entry point has."""
    return setting("auto", "auto, cpu, cuda or cuda:N")


def threads_setting():
    """The `num_threads` field every entry point has (threads.py measures the 0 case)."""
    return setting(0, "torch CPU threads (0: the faster of 1 and torch's default, measured)", lo=0)


@dataclass(frozen=True)
class ResAlignConfig:
    """Every setting of `python -m resalign_fast.train` (one flag per field: --field_name)."""

    # model and data
    pretrained_model_name_or_path: str = setting(
        "digits", "'digits' (the embedded default), a diffusers folder or a .safetensors file"
    )
    concept: int = setting(7, "digits world: the digit to erase", lo=0, hi=9)
    harmful_data: str = setting(
        "", "image folder with metadata.csv for D_harmful (empty: the digits world)"
    )
    preserve_data: str = setting("", "image folder for D_preserve (empty: the digits world)")
    ft_data: str = setting(
        "", "image folder for D_FT, the fine-tuning simulation data (empty: the digits world)"
    )
    output_dir: str = setting("outputs", "parent folder of run folders")
    run_name: str = setting(
        "", "run folder name under output_dir (empty: resalign-<concept>-s<seed>)"
    )
    seed: int = setting(0, "seed of everything", lo=0)
    device: str = device_setting()
    num_threads: int = threads_setting()
    frozen_dtype: str = setting(
        "fp32",
        "dtype of the frozen VAE, text encoder and original-UNet copy",
        choices=("fp32", "bf16", "fp16"),
    )
    allow_pickle: bool = setting(
        False, "also read pickled .bin/.ckpt weights (safetensors only otherwise)"
    )
    single_file_config: str = setting(
        "", "local diffusers folder with the component configs of a single-file checkpoint"
    )
    # theta
    theta: str = setting("lora", "trainable unlearning parameters", choices=("lora", "full"))
    lora_rank: int = setting(4, "LoRA rank of theta", lo=1)
    lora_alpha: float = setting(4.0, "LoRA alpha (scale alpha/rank)", lo=0)
    lora_init: str = setting(
        "gaussian", "peft init_lora_weights for theta", choices=("gaussian", "default")
    )
    lora_placement: str = setting(
        "all", "attention layers that carry LoRA", choices=("all", "cross", "self")
    )
    # objective
    harmful_loss: str = setting(
        "esd",
        "harmful loss L_h: gradient ascent, ESD negative guidance, or ESD on the guidance "
        "direction (digits: esd)",
        choices=("ga", "esd", "guidance"),
    )
    esd_eta: float = setting(1.0, "ESD negative-guidance strength eta", lo=0)
    lam: float = setting(0.8, "lambda, weight of the recovered-harm term", lo=0, hi=1)
    w_r_start: float = setting(1.6, "preservation weight w_r at the start", lo=0)
    w_r_end: float = setting(
        2.0, "w_r after the sigmoid ramp over the second half of training", lo=0
    )
    # outer loop
    outer_steps: int = setting(30, "outer steps (reference 160; digits: 30)", lo=1)
    configs_per_step: int = setting(3, "k, fine-tuning configurations sampled per outer step", lo=1)
    lr: float = setting(
        2e-3,
        "outer AdamW learning rate (reference 2e-4; digits: 2e-3)",
        lo=0,
        aliases=("--learning_rate",),
    )
    weight_decay: float = setting(1e-2, "outer AdamW weight decay", lo=0)
    batch_size: int = setting(4, "images per batch for L_h and R", lo=1)
    # fine-tuning simulation
    ft_space: str = setting(
        "digits", "pi(C): a shipped configuration file name (digits, reference) or a .toml path"
    )
    ft_carry: int = setting(
        0,
        "carry each configuration slot's simulation across outer steps for up to N steps "
        "(0: every simulation starts at theta)",
        lo=0,
    )
    proximal: bool = setting(False, "simulate the proximal point instead of plain steps")
    # hypergradient
    hypergrad: str = setting(
        "implicit",
        "hypergradient: implicit (Moreau envelope), unrolled or first_order",
        choices=("implicit", "unrolled", "first_order"),
    )
    solver: str = setting(
        "richardson",
        "linear solver of (I + gamma H) v = b",
        choices=("richardson", "cg", "neumann"),
    )
    hvp: str = setting(
        "exact",
        "Hessian-vector products: double backward, forward-over-reverse, or finite differences",
        choices=("exact", "jvp", "fd"),
    )
    gamma: float = setting(1.0, "proximal strength gamma", lo=0)
    iters: int = setting(5, "solver iterations K", lo=0)
    alpha: float = setting(1.0, "Richardson step alpha", lo=0)
    max_grad_norm: float = setting(
        0.2, "guard: halve alpha when the hypergradient norm exceeds this", lo=0
    )
    max_retries: int = setting(
        5, "guard: retries before falling back to the first-order gradient", lo=0
    )
    guard: str = setting(
        "stable",
        "safeguard of the Richardson solve (cg and neumann always use reference)",
        choices=("stable", "reference"),
    )
    power_iters: int = setting(3, "stable guard: power-iteration HVPs for the step size", lo=1)
    unroll_steps: int = setting(
        0, "unrolled mode: differentiate through the last T steps (0: all)", lo=0
    )
    gradient_checkpointing: bool = setting(
        False, "recompute UNet block activations in the backward passes"
    )
    split_terms: bool = setting(
        True, "DreamBooth configurations: differentiate the instance and prior terms one at a time"
    )
    lean_full: bool = setting(
        False, "full-parameter configurations of pi(C): simulate in place on the UNet's weights"
    )
    offload_optimizer_state: bool = setting(
        False, "lean_full: keep the simulated optimizer's state in host memory"
    )
    attention: str = setting(
        "auto",
        "UNet attention: auto/lean (fused first order, chunked second), chunked, math",
        choices=("auto", "lean", "chunked", "math"),
    )
    # run management
    checkpoint_every: int = setting(5, "write a resumable checkpoint every N outer steps", lo=1)
    resume: bool = setting(False, "continue from the run folder's last checkpoint")
    samples_per_prompt: int = setting(4, "images per prompt in the before/after sample grids", lo=0)
    sample_steps: int = setting(25, "DDIM steps for samples", lo=1)
    guidance: float = setting(
        1.5, "classifier-free guidance for samples (digits: 1.5; SD: 7.5)", lo=0
    )
    nan_policy: str = setting(
        "skip",
        "on a NaN/inf loss or hypergradient: skip the outer step (logged) or abort",
        choices=("skip", "abort"),
    )
    progress: bool = setting(True, "show a progress bar")

    def check(self) -> None:
        """The combinations of settings a ResAlign run cannot take (called by `validate`)."""
        if self.hvp == "jvp" and self.gradient_checkpointing:
            raise ConfigError(
                "hvp: 'jvp' cannot be combined with gradient_checkpointing "
                "(torch.func transforms do not support checkpointing's saved-tensor "
                "hooks); use hvp 'exact' or 'fd' with checkpointing"
            )
        if self.ft_carry and (self.lean_full or self.hypergrad == "unrolled"):
            raise ConfigError(
                "ft_carry: needs the ordinary simulation (not lean_full) and "
                "implicit or first_order hypergradients"
            )
        if self.lean_full:
            why = [
                w
                for w, bad in (
                    ("hvp 'fd'", self.hypergrad == "implicit" and self.hvp != "fd"),
                    ("proximal false", self.proximal),
                    (
                        "hypergrad implicit or first_order, not unrolled",
                        self.hypergrad == "unrolled",
                    ),
                )
                if bad
            ]
            if why:
                raise ConfigError(
                    f"lean_full: needs {', '.join(why)} (in-place simulation keeps "
                    "no trajectory, no anchor copy, and in-place HVPs are finite "
                    "differences)"
                )


def coerce(f: dataclasses.Field, value: Any) -> Any:
    """`value` (a flag's string or a TOML value) as the field's type; booleans are no numbers, and
    numbers must be finite (`nan < lo` is False, so a range check alone lets NaN through)."""
    t = f.type if isinstance(f.type, str) else f.type.__name__
    try:
        if t == "bool":
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("1", "true", "yes")
            if not isinstance(value, (bool, int)) or value not in (0, 1):
                raise ValueError(value)
            return bool(value)
        if t in ("int", "float") and isinstance(value, bool):
            raise ValueError(value)  # TOML `lr = true` is no number
        if t == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if t == "float":
            v = float(value)
            if not math.isfinite(v):
                raise ConfigError(f"{f.name}: {value!r} is not a finite number")
            return v
        return str(value)
    except (TypeError, ValueError, OverflowError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{f.name}: expected {t}, got {value!r}") from None


def validate(cfg: T) -> T:
    """Check every field of a `setting`-built dataclass against its choices and range, then the
    class's own `check()` (combinations it cannot take) when it has one; returns cfg."""
    for f in fields(cfg):
        v, m = getattr(cfg, f.name), f.metadata
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{f.name}: {v} is not a finite number")
        if m.get("choices") and v not in m["choices"]:
            raise ConfigError(f"{f.name}: {v!r} is not one of {m['choices']}")
        if m.get("lo") is not None and v < m["lo"]:
            raise ConfigError(f"{f.name}: {v} is below the minimum {m['lo']}")
        if m.get("hi") is not None and v > m["hi"]:
            raise ConfigError(f"{f.name}: {v} is above the maximum {m['hi']}")
    if hasattr(cfg, "check"):
        cfg.check()
    return cfg


def from_dict(d: dict, base: Any = None, source: str = "config", cls: type | None = None):
    """Override `base` (default: cls(), cls defaulting to type(base) or ResAlignConfig) with the
    keys of `d`, coerced to the field types and validated.

    Raises:
        ConfigError: an unknown key, a value of the wrong type, or one outside the field's range
            or choices.
    """
    cls = cls or (type(base) if base is not None else ResAlignConfig)
    base = base if base is not None else cls()
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}")
    return validate(dataclasses.replace(base, **{k: coerce(known[k], v) for k, v in d.items()}))


def load_toml(path: str | Path) -> dict:
    """Read a TOML file with errors that name it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such config file")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def to_toml(cfg) -> str:
    """A resolved (flat) config dataclass as TOML, loadable with --config."""
    lines = []
    for k, v in to_dict(cfg).items():
        if isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, (int, float)):
            lines.append(f"{k} = {v!r}")
        else:  # a TOML basic string: JSON's escapes (\\, \", \uXXXX) are valid TOML
            lines.append(f"{k} = {json.dumps(str(v))}".replace("\x7f", "\\u007f"))
    return "\n".join(lines) + "\n"
