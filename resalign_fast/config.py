"""Run configuration: frozen dataclasses, the only place defaults live; CLI flags are generated from them.

Precedence: dataclass defaults < `--config file.toml` < command-line flags. Unknown keys and
out-of-range values are errors that name the key.

Defaults follow the reference recipe of METHOD.md (lambda 0.8, K = 5, gamma = 1, alpha = 1,
max_grad_norm 0.2, 5 retries, k = 3, AdamW lr 2e-4 wd 1e-2, w_r 1.6 -> 2.0, rank-4 LoRA on q/k/v/out),
scaled for the digits world only where noted in the field's help ("digits:").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names the key."""


def _f(default: Any, help: str, choices: Optional[tuple] = None, lo: Optional[float] = None, hi: Optional[float] = None):
    return field(default=default, metadata={"help": help, "choices": choices, "lo": lo, "hi": hi})


@dataclass(frozen=True)
class ResAlignConfig:
    """Every setting of `python -m resalign_fast.train` (one flag per field: --field_name)."""

    # model and data
    pretrained_model_name_or_path: str = _f("digits", "'digits' (the embedded default), a local diffusers folder or a single .safetensors file")
    concept: int = _f(7, "digits world: the digit to erase", lo=0, hi=9)
    harmful_data: str = _f("", "image folder with metadata.csv for D_harmful (empty: the digits world)")
    preserve_data: str = _f("", "image folder for D_preserve (empty: the digits world)")
    ft_data: str = _f("", "image folder for D_FT, the fine-tuning simulation data (empty: the digits world)")
    output_dir: str = _f("outputs", "parent folder of run folders")
    run_name: str = _f("", "run folder name under output_dir (empty: resalign-<concept>-s<seed>)")
    seed: int = _f(0, "seed of everything", lo=0)
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    num_threads: int = _f(0, "torch CPU threads (0: the faster of 1 and torch's default, measured at start on this machine; see threads.py)", lo=0)
    frozen_dtype: str = _f("fp32", "dtype of the frozen VAE, text encoder and original-UNet copy (bf16/fp16 save GPU memory)", choices=("fp32", "bf16", "fp16"))
    allow_pickle: bool = _f(False, "also read pickled .bin/.ckpt weights (torch.load weights_only=True); safetensors only otherwise")
    single_file_config: str = _f("", "local diffusers folder with the component configs of a single-file checkpoint")
    # theta
    theta: str = _f("lora", "trainable unlearning parameters", choices=("lora", "full"))
    lora_rank: int = _f(4, "LoRA rank of theta", lo=1)
    lora_alpha: float = _f(4.0, "LoRA alpha (scale alpha/rank)", lo=0)
    lora_init: str = _f("gaussian", "peft init_lora_weights for theta", choices=("gaussian", "default"))
    lora_placement: str = _f("all", "attention layers that carry LoRA", choices=("all", "cross", "self"))
    # objective
    harmful_loss: str = _f("esd", "harmful loss L_h: gradient ascent (the reference default) or ESD negative guidance (digits: esd; plain unlearning at lr 2e-3 on the earlier 700-step base: esd took the harmful rate 0.93 -> 0.03 at benign accuracy 0.60, ga -> 0.31 at 0.45; on the shipped base, esd: 0.99 -> 0.08 at 0.94; docs/evaluation.md); guidance: ESD's target on the guidance direction eps(c) - eps(""), blind to drift that both branches share)", choices=("ga", "esd", "guidance"))
    esd_eta: float = _f(1.0, "ESD negative-guidance strength eta", lo=0)
    lam: float = _f(0.8, "lambda, weight of the recovered-harm term", lo=0, hi=1)
    w_r_start: float = _f(1.6, "preservation weight w_r at the start", lo=0)
    w_r_end: float = _f(2.0, "w_r after the sigmoid ramp over the second half of training", lo=0)
    # outer loop
    outer_steps: int = _f(30, "outer steps (reference 160; digits: 30, to fit 10 minutes on 2 CPU cores)", lo=1)
    configs_per_step: int = _f(3, "k, fine-tuning configurations sampled per outer step", lo=1)
    lr: float = _f(2e-3, "outer AdamW learning rate (reference 2e-4 over 160 steps; digits: 2e-3 over 30 steps, the smallest that erased the digit, docs/evaluation.md)", lo=0)
    weight_decay: float = _f(1e-2, "outer AdamW weight decay", lo=0)
    batch_size: int = _f(4, "images per batch for L_h and R (the simulation uses pi(C)'s batch_size)", lo=1)
    # fine-tuning simulation
    ft_space: str = _f("digits", "pi(C): a shipped configuration file name (digits, reference) or a .toml path")
    ft_carry: int = _f(0, "continue each configuration slot's simulated fine-tuning across outer steps (its displacement theta* - theta and optimizer state carried while the slot draws the same configuration) for up to this many accumulated steps, then restart at theta (0: every simulation starts at theta, as the paper)", lo=0)
    proximal: bool = _f(False, "simulate the proximal point (add ||phi-theta||^2/(2 gamma) to the FT loss) instead of plain steps")
    # hypergradient
    hypergrad: str = _f("implicit", "implicit (Moreau envelope), unrolled (backprop through the last unroll_steps), or first_order (d theta*/d theta = I)", choices=("implicit", "unrolled", "first_order"))
    solver: str = _f("richardson", "linear solver of (I + gamma H) v = b", choices=("richardson", "cg", "neumann"))
    hvp: str = _f("exact", "Hessian-vector products: double backward, forward-over-reverse, or finite differences", choices=("exact", "jvp", "fd"))
    gamma: float = _f(1.0, "proximal strength gamma", lo=0)
    iters: int = _f(5, "solver iterations K", lo=0)
    alpha: float = _f(1.0, "Richardson step alpha", lo=0)
    max_grad_norm: float = _f(0.2, "guard: halve alpha when the hypergradient norm exceeds this", lo=0)
    max_retries: int = _f(5, "guard: retries before falling back to the first-order gradient", lo=0)
    guard: str = _f("stable", "safeguard of the Richardson solve: stable (step from the measured top curvature, start at the first-order answer, fall back to the first-order resilience term) or reference (the paper's: halve alpha, retry, fall back to the direct gradient); the cg and neumann solvers always use reference", choices=("stable", "reference"))
    power_iters: int = _f(3, "stable guard: power-iteration HVPs for the step size on a configuration slot's first solve (1 afterwards, warm-started)", lo=1)
    unroll_steps: int = _f(0, "unrolled mode: differentiate through the last T steps (0: all)", lo=0)
    gradient_checkpointing: bool = _f(False, "recompute UNet block activations in the backward passes")
    split_terms: bool = _f(True, "DreamBooth configurations: differentiate the instance and prior loss terms one at a time (gradients and HVPs summed term by term; an exact HVP rebuilds its graph per term) instead of holding both forward graphs at once (planner, SD v1.4 512 px, exact HVPs: 7.64 GiB instead of 13.47 GiB)")
    lean_full: bool = _f(False, "full-parameter configurations of pi(C): simulate in place on the UNet's weights (starting weights kept in host memory, optimizer step inside the backward pass) and run fd HVPs in place; needs hvp 'fd', plain (not proximal) steps, implicit or first_order hypergradients (planner, SD v1.4 512 px, checkpointing: 13.3 GiB instead of 29.4 GiB)")
    offload_optimizer_state: bool = _f(False, "lean_full: keep the simulated optimizer's state in host memory, streamed per parameter (same trajectory bit for bit)")
    attention: str = _f("auto", "attention for the UNet: auto (lean: fused first order, chunked second order), math", choices=("auto", "lean", "math"))
    # run management
    checkpoint_every: int = _f(5, "write a resumable checkpoint every N outer steps", lo=1)
    resume: bool = _f(False, "continue from the run folder's last checkpoint")
    samples_per_prompt: int = _f(4, "images per prompt in the before/after sample grids", lo=0)
    sample_steps: int = _f(25, "DDIM steps for samples", lo=1)
    guidance: float = _f(1.5, "classifier-free guidance for samples (digits: 1.5, the evaluation's DIGITS_GUIDANCE; SD: 7.5)", lo=0)
    nan_policy: str = _f("skip", "on a NaN/inf loss or hypergradient: skip the outer step (logged) or abort", choices=("skip", "abort"))
    progress: bool = _f(True, "show a progress bar")


def _coerce(f: dataclasses.Field, value: Any) -> Any:
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


def validate_fields(cfg):
    """Check every field of any `_f`-built dataclass against its choices and range; returns cfg."""
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
    return cfg


def validate(cfg: ResAlignConfig) -> ResAlignConfig:
    """validate_fields plus the combinations a ResAlign run cannot take; returns cfg."""
    validate_fields(cfg)
    if cfg.hvp == "jvp" and cfg.gradient_checkpointing:
        raise ConfigError("hvp: 'jvp' cannot be combined with gradient_checkpointing (torch.func transforms do not "
                          "support checkpointing's saved-tensor hooks); use hvp 'exact' or 'fd' with checkpointing")
    if cfg.ft_carry and (cfg.lean_full or cfg.hypergrad == "unrolled"):
        raise ConfigError("ft_carry: needs the ordinary simulation (not lean_full) and implicit or first_order hypergradients")
    if cfg.lean_full:
        why = [w for w, bad in (("hvp 'fd'", cfg.hypergrad == "implicit" and cfg.hvp != "fd"),
                                ("proximal false", cfg.proximal),
                                ("hypergrad implicit or first_order, not unrolled", cfg.hypergrad == "unrolled")) if bad]
        if why:
            raise ConfigError(f"lean_full: needs {', '.join(why)} (in-place simulation keeps no trajectory, "
                              "no anchor copy, and in-place HVPs are finite differences)")
    return cfg


def from_dict(d: dict, base: Optional[ResAlignConfig] = None, source: str = "config") -> ResAlignConfig:
    """Override `base` (default: the defaults) with the keys of `d`; unknown keys are errors."""
    base = base or ResAlignConfig()
    known = {f.name: f for f in fields(ResAlignConfig)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}")
    return validate(dataclasses.replace(base, **{k: _coerce(known[k], v) for k, v in d.items()}))


def load_toml(path: str | Path) -> dict:
    """Read a TOML file with errors that name it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such config file")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None


def build_parser(cls=ResAlignConfig, description: str = "", prog: Optional[str] = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per dataclass field (defaults are None: only given flags override).

    The description keeps its line breaks (examples stay one per line); choice flags show their
    choices; prog is `python -m resalign_fast.<module>` when run as a module of this package.
    ResAlignConfig's `--lr` also answers to the diffusers name `--learning_rate`.
    """
    if prog is None:
        a0 = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
        if a0 is not None and a0.suffix == ".py" and a0.parent == Path(__file__).resolve().parent:
            prog = f"python -m resalign_fast.{a0.stem}"
    p = argparse.ArgumentParser(description=description, prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=str, default=None, help="TOML file of settings (flags override it)")
    aliases = {"lr": ["--learning_rate"]} if cls is ResAlignConfig else {}
    for f in fields(cls):
        m, t = f.metadata, (f.type if isinstance(f.type, str) else f.type.__name__)
        h = f"{m.get('help', '')} (default: {f.default})"
        names = [f"--{f.name}", *aliases.get(f.name, [])]
        if aliases.get(f.name):
            h += f"; also {', '.join(aliases[f.name])}"
        h = h.replace("%", "%%")  # argparse formats help strings with %
        if t == "bool":
            p.add_argument(*names, dest=f.name, default=None, action=argparse.BooleanOptionalAction, help=h)
        else:
            p.add_argument(*names, dest=f.name, default=None, metavar=None if m.get("choices") else t.upper(),
                           choices=m.get("choices"), help=h)
    return p


def parse_config(argv: Optional[list[str]] = None, description: str = "", prog: Optional[str] = None) -> ResAlignConfig:
    """Defaults < --config TOML < flags, validated (prog: the command shown in usage lines)."""
    ns = build_parser(description=description, prog=prog).parse_args(argv)
    cfg = from_dict(load_toml(ns.config), source=ns.config) if ns.config else ResAlignConfig()
    flags = {k: v for k, v in vars(ns).items() if k != "config" and v is not None}
    return from_dict(flags, base=cfg, source="command line")


def to_dict(cfg: ResAlignConfig) -> dict:
    return dataclasses.asdict(cfg)


def to_toml(cfg: ResAlignConfig) -> str:
    """The resolved config as TOML (loadable with --config)."""
    lines = []
    for k, v in to_dict(cfg).items():
        if isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, (int, float)):
            lines.append(f"{k} = {v!r}")
        else:  # a TOML basic string: JSON's escapes (\\, \", \uXXXX) are valid TOML
            lines.append(f"{k} = {json.dumps(str(v))}".replace("\x7f", "\\u007f"))
    return "\n".join(lines) + "\n"
