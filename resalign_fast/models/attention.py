"""A diffusers attention processor: fused kernels on first-order passes, lean exact attention on
second-order ones.

PyTorch's fused attention (and xformers) cannot be differentiated twice, and diffusers' math
`AttnProcessor` keeps every (N, N) probability matrix for the double backward of a Hessian-vector
product. `LeanAttnProcessor` does what `AttnProcessor2_0` does around the attention itself (spatial
norm, group norm, cross-attention norm, q/k norms, masks, residual, output rescale) and picks the
attention by the process-wide `attention_mode`, one of MODES (the one tuple of UNet attention
modes; other modules import it from here).

A mode is not an ops backend: each mode calls `resalign_fast.ops.attention.attention` with the
backend and differentiation order of MODE_BACKENDS, and the ops backend then runs:

    mode       ops call                   ops backend that runs
    "fused"    backend="sdpa", order=1    "sdpa" (F.scaled_dot_product_attention); first order
                                          only. On CUDA with xformers installed (use_xformers),
                                          xformers' memory-efficient attention instead, outside
                                          ops.
    "chunked"  backend="auto", order=2    "triton" for fp16/bf16 CUDA tensors without a mask
                                          (D == Dv <= 256, triton installed), else "chunked";
                                          exact at every order, O(N * chunk) memory.
    "math"     backend="math", order=2    "math" (`attention_ref`, plain softmax(q k^T) v, as
                                          diffusers' `AttnProcessor`); every order, O(N^2).

The mode is a process-global setting, not thread-local, on purpose: on CUDA the autograd engine runs
backward passes (and the recomputation of checkpointed blocks) on its own threads, which would not
see a thread-local mode and would recompute with the fused kernel.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator

import torch
from torch import Tensor

from resalign_fast.ops.attention import DEFAULT_CHUNK, attention

#: mode -> (ops backend, differentiation order) of resalign_fast.ops.attention.attention.
MODE_BACKENDS: dict[str, tuple[str, int]] = {
    "fused": ("sdpa", 1),
    "chunked": ("auto", 2),
    "math": ("math", 2),
}
#: The UNet attention modes, "fused", "chunked", "math".
MODES: tuple[str, ...] = tuple(MODE_BACKENDS)
_mode = "fused"


def get_attention_mode() -> str:
    """The current process-wide attention mode, one of MODES."""
    return _mode


@contextlib.contextmanager
def attention_mode(mode: str) -> Iterator[None]:
    """Select the attention of every `LeanAttnProcessor` while the block runs (process-wide).

    Args:
        mode: "fused" (first-order passes), "chunked" (second-order passes: HVPs by double
            backward or by forward-mode over reverse) or "math" (reference).

    Raises:
        ValueError: unknown mode.
    """
    global _mode
    if mode not in MODES:
        raise ValueError(f"attention mode must be one of {MODES}, got {mode!r}")
    previous, _mode = _mode, mode
    try:
        yield
    finally:
        _mode = previous


def _xformers_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float
) -> Tensor:
    """xformers memory-efficient attention on (B, H, N, D) tensors."""
    import xformers.ops as xops

    if mask is not None:
        mask = mask.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=mask, scale=scale
    )
    return out.transpose(1, 2)


class LeanAttnProcessor:
    """Drop-in for diffusers' `AttnProcessor2_0` whose attention follows `attention_mode`.

    Args:
        chunk: query rows per chunk in "chunked" mode.
        use_xformers: in "fused" mode on CUDA, use xformers' memory-efficient attention instead of
            SDPA. None: when xformers is installed.
    """

    def __init__(self, chunk: int = DEFAULT_CHUNK, use_xformers: bool | None = None) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        if use_xformers is None:
            use_xformers = importlib.util.find_spec("xformers") is not None
        elif use_xformers and importlib.util.find_spec("xformers") is None:
            raise ImportError("use_xformers=True but xformers is not installed")
        self.chunk = chunk
        self.use_xformers = use_xformers

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
        """(B, H, Nq, D), (B, H, Nk, D), (B, H, Nk, Dv) -> (B, H, Nq, Dv) in the current mode."""
        if _mode == "fused" and self.use_xformers and q.is_cuda:
            return _xformers_attention(q, k, v, mask, scale)
        backend, order = MODE_BACKENDS[_mode]
        return attention(q, k, v, scale, backend, order, mask, self.chunk)

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args,
        **kwargs,
    ) -> Tensor:
        """Run diffusers `Attention` module `attn` on (B, N, C) or (B, C, H, W) hidden states.

        Args:
            attn: the diffusers `Attention` module (weights, norms, flags).
            hidden_states: (B, N, C) or (B, C, H, W).
            encoder_hidden_states: (B, Nk, C_cross) for cross-attention, else None.
            attention_mask: additive mask (B, 1 or Nq, Nk) as diffusers passes it, or None.
            temb: (B, C_temb) for spatial norm, or None.

        Returns:
            Same shape as hidden_states.
        """
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, seq_len, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (
            x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = self._attend(query, key, value, attention_mask, attn.scale)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def set_lean_attention(
    model: torch.nn.Module, chunk: int = DEFAULT_CHUNK, use_xformers: bool | None = None
) -> int:
    """Install one `LeanAttnProcessor` on every diffusers `Attention` module of `model`.

    Args:
        model: a diffusers model (UNet2DConditionModel, ...) or any module containing `Attention`s.
        chunk: query rows per chunk in "chunked" mode.
        use_xformers: as `LeanAttnProcessor`.

    Returns:
        The number of attention modules changed.

    Raises:
        ValueError: the model has no diffusers `Attention` module.
    """
    from diffusers.models.attention_processor import Attention

    processor = LeanAttnProcessor(chunk, use_xformers)
    modules = [m for m in model.modules() if isinstance(m, Attention)]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no diffusers Attention module")
    for m in modules:
        m.set_processor(processor)
    return len(modules)
