"""The project's own outer step (`resalign_fast.bilevel.ResAlign.step`) run on meta tensors.

`recipes.OuterStep` is the step as the planner specifies it; this module runs what the trainer
really runs, one sampled configuration per step, so that the estimate follows the project's code
as it changes. Data sets, the noise schedule and the text embeddings are meta tensors of the
right shapes. Data-dependent reads return 1 (see `StorageTracker.fake_scalars`); the guard is
disabled (max_grad_norm = inf, no retries), as its retries repeat the same work at the same peak.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, ContextManager

import torch

from resalign_fast.memplan.recipes import FTConfig, Recipe, StepShape, host_allocations
from resalign_fast.memplan.unets import ModelSpec


def available() -> str:
    """Empty when `resalign_fast.bilevel` can be imported, else why not."""
    try:
        import resalign_fast.bilevel  # noqa: F401
    except Exception as e:  # any import failure of the project's trainer is a reason
        return f"{type(e).__name__}: {e}"
    return ""


def project_step(unet: torch.nn.Module, spec: ModelSpec, recipe: Recipe, C: FTConfig, shape: StepShape,
                 device: str = "meta", host: Callable[[], ContextManager] | None = None,
                 guard: str | None = None) -> None:
    """Run `ResAlign.step(0)` with one configuration equal to C.

    Args:
        unet: a UNet WITHOUT adapters (`build_unet(..., lora_rank=0)`); ResAlign adds theta's LoRA.
        spec, recipe, C, shape: as in `recipes.outer_step`. `recipe.split_terms` and
            `recipe.lean_full` become the config fields of the same names; `recipe.chunk` is the
            project's business here and is ignored.
        device: where the data tensors live ("meta" for an estimate).
        host: context manager under which storages count as host memory (`StorageTracker.host`):
            what the lean path allocates in host memory (`inner.inplace.host_empty`: the backup
            of the starting weights, the offloaded optimizer state) runs under it. None: counted
            like any other storage.
        guard: the trainer's config field `guard` ("stable", "reference"); None: the recipe's
            (`Recipe.guard`). "reference" runs one attempt of the plain Richardson solve (no retries).
    """
    from resalign_fast.bilevel import ResAlign
    from resalign_fast.config import ResAlignConfig
    from resalign_fast.data.encoded import EncodedSet
    from resalign_fast.inner.configs import FTConfig as ProjectFT
    from resalign_fast.inner.configs import FTSpace

    cfg = ResAlignConfig(
        theta="lora", hvp=recipe.hvp, attention="math" if recipe.attention == "math" else "auto",
        gradient_checkpointing=recipe.checkpointing, batch_size=shape.batch, iters=shape.iters,
        configs_per_step=1, lam=shape.lam, gamma=shape.gamma, alpha=shape.alpha,
        max_grad_norm=float("inf"), max_retries=0, progress=False, split_terms=recipe.split_terms,
        lean_full=recipe.lean_full, offload_optimizer_state=recipe.offload_state,
        guard=recipe.guard if guard is None else guard)
    n = shape.batch

    def encoded() -> EncodedSet:
        return EncodedSet(torch.randn(spec.latent_shape(n, shape.resolution), device=device),
                          torch.randn(spec.text_shape(n), device=device), [""] * n)

    model = SimpleNamespace(unet=unet, frozen_dtype=torch.float32,
                            scheduler=SimpleNamespace(alphas_cumprod=torch.linspace(0.999, 0.01, 1000)))
    space = FTSpace((ProjectFT(lr=1e-5, steps=shape.sim_steps, loss=C.loss, algorithm=C.algo,
                               optimizer=C.optim, batch_size=n),))
    data = {"harmful": encoded(), "preserve": encoded(), "ft": encoded()}
    trainer = ResAlign(cfg, model, data, space, torch.randn(spec.text_shape(1), device=device))
    with host_allocations(host):  # on meta tensors host memory cannot be real host memory
        trainer.step(0)
