"""Attention a recipe puts into the UNet, switched by the differentiation order of each pass.

Recipe attention modes:

* "math": diffusers' classic `AttnProcessor` (baddbmm + softmax: every (N, N) score and
  probability matrix is materialised and saved, and kept again by a double backward). This is
  what the reference code runs.
* "chunked": the project's `LeanAttnProcessor` in mode "chunked" for every pass (exact attention
  with O(N * chunk) memory at every order).
* "fused": `LeanAttnProcessor` in mode "fused" (PyTorch SDPA) for first-order passes and
  "chunked" for passes differentiated twice (exact and jvp HVPs), the intended use of
  `resalign_fast.models.attention`.

The recipe marks second-order passes with `diff_order(2)`.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

MODES = ("math", "chunked", "fused")

_STATE = {"recipe_mode": "math"}


@contextlib.contextmanager
def diff_order(order: int) -> Iterator[None]:
    """Declare that the passes inside the block are differentiated `order` times.

    With the "fused" recipe mode, order >= 2 switches the UNet's attention to "chunked".

    Args:
        order: 1 for first-order gradients, 2 for exact or jvp HVPs.
    """
    if order >= 2 and _STATE["recipe_mode"] == "fused":
        from resalign_fast.models.attention import attention_mode

        with attention_mode("chunked"):
            yield
    else:
        yield


@contextlib.contextmanager
def use_attention(unet: torch.nn.Module, mode: str, chunk: int = 1024) -> Iterator[None]:
    """Run the block with recipe attention `mode` in every attention layer of `unet`.

    Args:
        unet: a diffusers UNet.
        mode: one of MODES.
        chunk: query rows per chunk (lean modes).

    Raises:
        ValueError: unknown mode.
    """
    if mode not in MODES:
        raise ValueError(f"unknown attention mode {mode!r}; choose one of {MODES}")
    previous = _STATE["recipe_mode"]
    _STATE["recipe_mode"] = mode
    try:
        if mode == "math":
            from diffusers.models.attention_processor import AttnProcessor

            unet.set_attn_processor(AttnProcessor())
            yield
            return
        from resalign_fast.models.attention import attention_mode, set_lean_attention

        set_lean_attention(unet, chunk=chunk, use_xformers=False)
        with attention_mode(mode):
            yield
    finally:
        _STATE["recipe_mode"] = previous
