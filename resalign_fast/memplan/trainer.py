"""The planner's one engine: the trainer's own outer step (`resalign_fast.bilevel.ResAlign`).

`trainer_step` runs `ResAlign.step(0)` with one sampled configuration, on meta tensors for an
estimate or on real tensors for a measurement; `trainer_hypergradient` returns that configuration's
hypergradient from the trainer's public phases. Data sets, the noise schedule and the text
embeddings are random tensors of the right shapes. On meta tensors data-dependent reads return 1
(see `StorageTracker.fake_scalars`); the guard runs one attempt (`recipes.trainer_config`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from types import SimpleNamespace

import torch
from torch import Tensor

from resalign_fast.bilevel import ResAlign, config_generator, step_generator
from resalign_fast.data.encoded import EncodedSet
from resalign_fast.memplan.recipes import ConfigKind, Recipe, StepShape, trainer_config
from resalign_fast.memplan.tracker import StorageTracker
from resalign_fast.memplan.unets import ModelSpec


@contextlib.contextmanager
def host_allocations(host: Callable[[], AbstractContextManager] | None) -> Iterator[None]:
    """While the block runs, what `resalign_fast.inner.inplace` allocates in host memory (its
    `host_empty`: the lean path's weight backup and offloaded optimizer state) is made under
    `host()` (`StorageTracker.host`: counted as host memory; on meta or CPU tensors it cannot
    really go there). None: nothing changes."""
    if host is None:
        yield
        return
    from resalign_fast.inner import inplace

    host_empty = inplace.host_empty

    def counted_as_host(like: Tensor) -> Tensor:
        with host():
            return host_empty(like)

    inplace.host_empty = counted_as_host
    try:
        yield
    finally:
        inplace.host_empty = host_empty


def build_trainer(
    unet: torch.nn.Module,
    spec: ModelSpec,
    recipe: Recipe,
    kind: ConfigKind,
    shape: StepShape,
    *,
    device: str = "meta",
    dtype: torch.dtype = torch.float32,
    guard: str | None = None,
) -> ResAlign:
    """A `ResAlign` on `unet` whose pi(C) is the one configuration `kind`.

    Args:
        unet: a UNet WITHOUT adapters (`unets.build_unet`); ResAlign adds theta's LoRA.
        device, dtype: where and in which dtype the data tensors live ("meta" for an estimate).
        guard: the trainer's `guard`; None: the recipe's (`Recipe.guard`).
    """
    cfg, space = trainer_config(recipe, kind, shape, guard)
    n = shape.batch

    def encoded() -> EncodedSet:
        return EncodedSet(
            torch.randn(spec.latent_shape(n, shape.resolution), device=device, dtype=dtype),
            torch.randn(spec.text_shape(n), device=device, dtype=dtype),
            [""] * n,
        )

    model = SimpleNamespace(
        unet=unet,
        frozen_dtype=torch.float32,
        scheduler=SimpleNamespace(alphas_cumprod=torch.linspace(0.999, 0.01, 1000)),
    )
    data = {"harmful": encoded(), "preserve": encoded(), "ft": encoded()}
    uncond = torch.randn(spec.text_shape(1), device=device, dtype=dtype)
    trainer = ResAlign(cfg, model, data, space, uncond_emb=uncond)
    if dtype != torch.float32:
        for p in trainer.theta:  # theta's adapter is made in fp32
            p.data = p.data.to(dtype)
    return trainer


def trainer_step(trainer: ResAlign, tracker: StorageTracker | None = None) -> None:
    """Run outer step 0; with a tracker, its phases are labelled on it and what the lean path
    keeps in host memory is counted as host memory."""
    if tracker is not None:
        trainer.phase = tracker.phase
    with host_allocations(None if tracker is None else tracker.host):
        trainer.step(0)


def trainer_hypergradient(trainer: ResAlign) -> list[Tensor]:
    """The hypergradient g_C of outer step 0's configuration, from the public phases (no update)."""
    cfg = trainer.cfg
    gen = step_generator(cfg.seed, 0)
    direct = trainer.direct_grad(0, gen)
    (c,) = trainer.ft_space.sample(1, gen)
    result = trainer.config_hypergrad(c, direct, config_generator(cfg.seed, 0, 0))
    return result.grad
