"""Memory planning: estimate the peak memory of one ResAlign outer step without weights or a GPU.

* ``tracker``: `StorageTracker`, live tensor-storage bytes and their peak (real or meta tensors).
* ``meta``: what meta tensors need to stand in for a device (fused SDPA, reference ops, op cache).
* ``unets``: SD v1.4's UNet config (and a tiny one), built with LoRA on every attention layer.
* ``recipes``: recipes (HVP backend x attention x checkpointing) and the outer step, phase by phase.
* ``project``: the project's own trainer step (`resalign_fast.bilevel`) on meta tensors.
* ``estimate``: `Estimator` (meta tensors) and `measure` (real CPU tensors, allocator counter).

The entry point is ``python -m resalign_fast.memory``.
"""

from resalign_fast.memplan.estimate import ConfigPeak, Estimator, measure
from resalign_fast.memplan.recipes import PI_C, REFERENCE, FTConfig, Recipe, StepShape
from resalign_fast.memplan.tracker import StorageTracker

__all__ = ["ConfigPeak", "Estimator", "FTConfig", "PI_C", "REFERENCE", "Recipe", "StepShape", "StorageTracker", "measure"]
