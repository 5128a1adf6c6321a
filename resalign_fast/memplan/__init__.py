"""Memory planning: estimate the peak memory of one ResAlign outer step without weights or a GPU.

* ``tracker``: `StorageTracker`, live tensor-storage bytes and their peak (real or meta tensors).
* ``meta``: what meta tensors need to stand in for a device (fused SDPA, reference ops, op cache).
* ``unets``: SD v1.4's UNet config (and a tiny one), built without weights on the meta device.
* ``recipes``: recipes (HVP backend x attention x checkpointing), pi(C)'s memory-relevant kinds and
  `trainer_config`, the one map from a recipe to the trainer's configuration.
* ``trainer``: the one engine, the trainer's own step (`resalign_fast.bilevel.ResAlign.step`).
* ``estimate``: `Estimator` (meta tensors) and `measure` (real CPU tensors, allocator counter).

The entry point is ``python -m resalign_fast.memory``.
"""

from resalign_fast.memplan.estimate import ConfigPeak, Estimator, measure
from resalign_fast.memplan.recipes import PI_C, REFERENCE, ConfigKind, Recipe, StepShape
from resalign_fast.memplan.tracker import StorageTracker

__all__ = [
    "ConfigKind",
    "ConfigPeak",
    "Estimator",
    "PI_C",
    "REFERENCE",
    "Recipe",
    "StepShape",
    "StorageTracker",
    "measure",
]
