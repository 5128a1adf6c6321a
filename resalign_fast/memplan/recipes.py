"""Recipes (how one outer step is computed), the memory-relevant configurations of pi(C), and the
one map from a recipe to the trainer's configuration (`trainer_config`).

The planner runs no outer step of its own: `memplan.trainer` runs the trainer's
`resalign_fast.bilevel.ResAlign.step` with the configuration `trainer_config` gives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from resalign_fast.config import ResAlignConfig
from resalign_fast.inner.configs import FTConfig, FTSpace

HVP_BACKENDS = ("exact", "jvp", "fd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ConfigKind:
    """The memory-relevant part of a fine-tuning configuration C of pi(C)
    (`inner.configs.FTConfig`).

    Learning rate and step count do not change the peak (no graph is kept between steps).

    Attributes:
        algo: "lora" (train theta's LoRA) or "full" (train every UNet parameter).
        optim: "sgd" or "adam" (two state buffers per parameter).
        loss: "standard" (one forward per step) or "dreambooth" (instance + prior forward).
    """

    algo: str
    optim: str
    loss: str

    @property
    def name(self) -> str:
        """Short label, e.g. "lora-adam-dreambooth"."""
        return f"{self.algo}-{self.optim}-{self.loss}"


PI_C: tuple[ConfigKind, ...] = tuple(
    ConfigKind(a, o, loss)
    for a in ("lora", "full")
    for o in ("sgd", "adam")
    for loss in ("standard", "dreambooth")
)


@dataclass(frozen=True)
class Recipe:
    """How the outer step is computed.

    Attributes:
        name: label in tables.
        hvp: HVP backend, "exact" (double backward), "jvp" (forward-over-reverse) or "fd".
        attention: "math", "chunked" or "fused": the trainer's `attention` "math", "chunked" or
            "lean" (fused first-order passes, chunked second-order ones), see `ATTENTION`.
        checkpointing: the trainer's gradient checkpointing of every block.
        weights: dtype of the frozen base weights ("fp32", "bf16", "fp16"); LoRA stays fp32.
        split_terms: DreamBooth losses are differentiated one term at a time (gradients
            accumulate; HVPs are summed term by term by `make_hvp`, an exact HVP rebuilding its
            graph per term), instead of holding both forward graphs at once (the trainer's
            config field of the same name).
        lean_full: full-parameter configurations (fd only) run the project's in-place path (the
            trainer's config field of the same name): host backup of the starting weights and
            optimizer-in-backward (`resalign_fast.inner.inplace`), in-place fd HVPs
            (`make_hvp(..., inplace=True)`).
        offload_state: with `lean_full`, the simulated optimizer's state lives in host memory and
            is streamed per parameter (`simulate_inplace(..., offload=True)`, the trainer's config
            field `offload_optimizer_state`).
        guard: the trainer's `guard`: "stable" (power iteration, then Richardson from b; on the lean
            path b and the eigenvector wait in host memory) or "reference" (the paper's Richardson
            from 0, one attempt traced).
    """

    name: str
    hvp: str
    attention: str
    checkpointing: bool
    weights: str = "fp32"
    split_terms: bool = True
    lean_full: bool = False
    offload_state: bool = False
    guard: str = "stable"


REFERENCE = Recipe(
    "reference",
    hvp="exact",
    attention="math",
    checkpointing=False,
    split_terms=False,
    guard="reference",
)


@dataclass(frozen=True)
class StepShape:
    """Sizes of one outer step.

    Attributes:
        batch: images per forward pass.
        resolution: image side in pixels.
        iters: Richardson iterations K.
        sim_steps: simulated optimizer steps (no graph is kept between steps: 1 gives the peak).
        lam, gamma, alpha: ResAlign's lambda, the proximal gamma and the Richardson step.
    """

    batch: int = 1
    resolution: int = 512
    iters: int = 5
    sim_steps: int = 2
    lam: float = 0.8
    gamma: float = 1.0
    alpha: float = 1.0


# the planner's attention names -> the trainer's `attention`
ATTENTION = {"math": "math", "chunked": "chunked", "fused": "lean"}


def trainer_config(
    recipe: Recipe, kind: ConfigKind, shape: StepShape, guard: str | None = None
) -> tuple[ResAlignConfig, FTSpace]:
    """The trainer's run configuration and pi(C) = {C} for one outer step of `recipe` on `kind`.

    One sampled configuration per step; the solver guard runs one attempt (max_grad_norm inf, no
    retries: a retry repeats the same work at the same peak).

    Args:
        guard: the trainer's `guard` ("stable", "reference"); None: the recipe's.
    """
    if recipe.hvp not in HVP_BACKENDS:
        raise ValueError(f"unknown hvp backend {recipe.hvp!r}; choose one of {HVP_BACKENDS}")
    if recipe.attention not in ATTENTION:
        raise ValueError(
            f"unknown attention mode {recipe.attention!r}; choose one of {tuple(ATTENTION)}"
        )
    cfg = ResAlignConfig(
        theta="lora",
        hvp=recipe.hvp,
        attention=ATTENTION[recipe.attention],
        gradient_checkpointing=recipe.checkpointing,
        batch_size=shape.batch,
        iters=shape.iters,
        configs_per_step=1,
        lam=shape.lam,
        gamma=shape.gamma,
        alpha=shape.alpha,
        max_grad_norm=float("inf"),
        max_retries=0,
        progress=False,
        split_terms=recipe.split_terms,
        lean_full=recipe.lean_full,
        offload_optimizer_state=recipe.offload_state,
        guard=recipe.guard if guard is None else guard,
    )
    c = FTConfig(
        lr=1e-5,
        steps=shape.sim_steps,
        loss=kind.loss,
        algorithm=kind.algo,
        optimizer=kind.optim,
        batch_size=shape.batch,
    )
    return cfg, FTSpace((c,))
