"""theta and the spaces the method differentiates in: LoRA adapters (peft) and full UNet weights.

Everything is functional: a `ParamSpace` names UNet parameters, and `space.eps(params, ...)` runs
the UNet with those parameters substituted (torch.func.functional_call), so the same module serves
theta, every simulated fine-tuning run and the frozen original model (adapter disabled: no second
copy).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.func import functional_call

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
PLACEMENT_ATTN = {"all": "attn[12]", "cross": "attn2", "self": "attn1"}


def add_lora(
    unet: torch.nn.Module,
    rank: int = 4,
    alpha: float = 4.0,
    init: str = "gaussian",
    placement: str = "all",
) -> None:
    """Add a peft LoRA adapter on q/k/v/out of the attention layers chosen by `placement`.

    Args:
        placement: "all", "cross" (cross-attention, attn2) or "self" (self-attention, attn1).
        init: peft init_lora_weights ("gaussian": A ~ N(0, 1/r), B = 0, so theta starts at the base
            model).
    """
    from peft import LoraConfig

    if placement not in PLACEMENT_ATTN:
        raise ValueError(
            f"lora placement must be one of {sorted(PLACEMENT_ATTN)}, got {placement!r}"
        )
    pattern = rf".*\.{PLACEMENT_ATTN[placement]}\.(to_q|to_k|to_v|to_out\.0)$"
    unet.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=alpha,
            init_lora_weights=True if init == "default" else init,
            target_modules=pattern,
        )
    )
    unet.requires_grad_(False)


def lora_names(unet: torch.nn.Module) -> list[str]:
    return [n for n, _ in unet.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def base_names(unet: torch.nn.Module) -> list[str]:
    return [n for n, _ in unet.named_parameters() if ".lora_" not in n]


def plain_name(name: str) -> str:
    """A base parameter's name in a UNet without adapters."""
    return name.replace(".base_layer.", ".")


@contextlib.contextmanager
def adapters_disabled(unet: torch.nn.Module) -> Iterator[None]:
    """Run the base model (the frozen original when theta is LoRA).

    Flips peft's per-layer flag directly: `unet.disable_adapters()` also calls requires_grad_(),
    which torch.func transforms (the jvp HVP backend) forbid.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    before = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m, b in zip(layers, before):
            m._disable_adapters = b


@dataclass
class ParamSpace:
    """A set of UNet parameters that functional calls substitute.

    Attributes:
        unet: the module. names: substituted parameter names.
        adapters: whether LoRA adapters are active during the call (False for full-weight spaces,
            whose values already contain any merged LoRA).
    """

    unet: torch.nn.Module
    names: list[str]
    adapters: bool = True

    def values(self) -> list[torch.Tensor]:
        p = dict(self.unet.named_parameters())
        return [p[n] for n in self.names]

    def eps(
        self, params: list[torch.Tensor], x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor
    ) -> torch.Tensor:
        """The UNet's prediction with `params` substituted. x: (B, C, H, W), t: (B,), emb: (B, L,
        D)."""
        ctx = contextlib.nullcontext() if self.adapters else adapters_disabled(self.unet)
        with ctx:
            return functional_call(
                self.unet, dict(zip(self.names, params)), (x, t, emb), strict=False
            ).sample

    def numel(self) -> int:
        return sum(v.numel() for v in self.values())


def lora_pairs(unet: torch.nn.Module) -> dict[str, tuple[str, str, float]]:
    """base weight name -> (lora_A name, lora_B name, scale) for every adapted layer."""
    out = {}
    for mod_name, mod in unet.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            out[f"{mod_name}.base_layer.weight"] = (
                f"{mod_name}.lora_A.default.weight",
                f"{mod_name}.lora_B.default.weight",
                float(mod.scaling["default"]),
            )
    return out


def merge_map(
    unet: torch.nn.Module, theta_space: ParamSpace, full_names: list[str]
) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """phi0(theta): full base weights with theta's LoRA merged in, differentiable in theta.

    W' = W + scale * B @ A on every adapted layer; other weights are the base tensors themselves
    (no copy). The returned map takes theta (LoRA tensors in theta_space order).
    """
    pairs = lora_pairs(unet)
    pos = {n: i for i, n in enumerate(theta_space.names)}
    base = dict(unet.named_parameters())

    def phi0(theta: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for n in full_names:
            if n in pairs:
                a, b, s = pairs[n]
                out.append(base[n] + s * (theta[pos[b]] @ theta[pos[a]]))
            else:
                out.append(base[n])
        return out

    return phi0


def merged_state_dict(
    unet: torch.nn.Module,
    theta: list[torch.Tensor] | None = None,
    theta_space: ParamSpace | None = None,
) -> dict[str, torch.Tensor]:
    """State dict of a plain UNet (no adapter) with theta merged in, for diffusers-format export."""
    sd = {}
    full = base_names(unet)
    vals = (
        merge_map(unet, theta_space, full)(theta)
        if theta is not None
        else [dict(unet.named_parameters())[n] for n in full]
    )
    for n, v in zip(full, vals):
        sd[plain_name(n)] = v.detach().clone().contiguous()
    for n, b in unet.named_buffers():
        sd[plain_name(n)] = b.detach().clone()
    return sd
