"""Estimate (meta tensors, nothing runs) and measure (real tensors, CPU allocator) a step's peak.

`Estimator` builds the UNet on the meta device (no weights, no memory), runs the trainer's own
outer step (`memplan.trainer`) on meta tensors under a `StorageTracker` and reports the peak of live
storage bytes. `measure` runs the same step on real tensors and reads the peak from the CPU
allocator itself (the profiler's allocation events carry the allocator's running total), so the
two are independent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from resalign_fast.memplan.meta import MetaOpCache, reference_ops, sdpa_as
from resalign_fast.memplan.recipes import DTYPES, PI_C, ConfigKind, Recipe, StepShape
from resalign_fast.memplan.tracker import CUDA_BLOCK, PhasePeak, StorageTracker, module_bytes
from resalign_fast.memplan.trainer import build_trainer, trainer_step
from resalign_fast.memplan.unets import MODELS, ModelSpec, build_unet


@dataclass
class ConfigPeak:
    """Peak of one outer step for one fine-tuning configuration.

    Attributes:
        config: the configuration's name.
        peak: peak bytes (None when the recipe cannot run this configuration).
        phase: the phase holding the peak.
        phases: per-phase peaks in bytes.
        weights: bytes of the UNet's parameters and buffers (part of the peak).
        error: why the step failed, when it did.
        seconds: wall time of the traced step.
    """

    config: str
    peak: int | None
    phase: str = ""
    phases: dict[str, int] = field(default_factory=dict)
    weights: int = 0
    error: str = ""
    seconds: float = 0.0


class Estimator:
    """Traces the trainer's outer step on a meta UNet (a fresh one per trace: the trainer adds its
    adapter and settings to it).

    Args:
        model: a key of `MODELS` or a `ModelSpec`.
        shape: batch, resolution and iteration counts.
        block: allocator rounding in bytes (512: CUDA caching allocator; 1: exact).
        target: device whose fused attention kernels are modelled, "cuda" or "cpu".
        guard: the trainer's `guard` for every recipe; None: each recipe's own.
    """

    def __init__(
        self,
        model: str | ModelSpec = "sd-v1-4",
        shape: StepShape = StepShape(),
        block: int = CUDA_BLOCK,
        target: str = "cuda",
        guard: str | None = None,
    ) -> None:
        if isinstance(model, str):
            if model not in MODELS:
                raise ValueError(f"unknown model {model!r}; known: {sorted(MODELS)}")
            model = MODELS[model]
        self.spec, self.shape, self.block, self.target, self.guard = (
            model,
            shape,
            block,
            target,
            guard,
        )
        self.cache = True
        self._cache = MetaOpCache()

    def _trace(self, recipe: Recipe, kind: ConfigKind, explain_at: int | None = None):
        """Trace one outer step; (tracker report, weight bytes, seconds)."""
        if recipe.weights not in DTYPES:
            raise ValueError(
                f"unknown weights dtype {recipe.weights!r}; choose one of {sorted(DTYPES)}"
            )
        with torch.device("meta"):
            unet = build_unet(self.spec, dtype=DTYPES[recipe.weights])
        tracker = StorageTracker(
            self.block,
            fake_scalars=True,
            run_op=self._cache if self.cache else None,
            explain_at=explain_at,
        )
        self.last_tracker = tracker
        t0 = time.perf_counter()
        with reference_ops(), sdpa_as(self.target), tracker:
            tracker.register(list(unet.parameters()) + list(unet.buffers()))
            trainer = build_trainer(unet, self.spec, recipe, kind, self.shape, guard=self.guard)
            trainer_step(trainer, tracker)
        return tracker.report(), module_bytes(unet, self.block), time.perf_counter() - t0

    def run(self, recipe: Recipe, config: ConfigKind) -> ConfigPeak:
        """Estimated peak of one outer step of `recipe` for `config`; a recipe that cannot run a
        configuration is reported (`ConfigPeak.error`), not raised."""
        t0 = time.perf_counter()
        try:
            rep, weights, sec = self._trace(recipe, config)
        except Exception as e:  # a recipe that cannot run a config is reported, not fatal
            return ConfigPeak(config.name, None, error=_why(e), seconds=time.perf_counter() - t0)
        return ConfigPeak(
            config.name, rep.peak, rep.peak_phase, _phase_peaks(rep.phases), weights, seconds=sec
        )

    def explain(
        self, recipe: Recipe, config: ConfigKind, top: int = 12
    ) -> list[tuple[str, int, int]]:
        """What is live at the peak of `recipe` on `config`: the `top` groups of storages by the
        operator (and phase), shape and dtype that allocated them, largest first.

        Returns:
            [(label, count, bytes)]; "registered" labels the UNet's weights and buffers.
        """
        peak = self.run(recipe, config)
        if peak.peak is None:
            raise RuntimeError(f"{recipe.name} on {config.name} does not run: {peak.error}")
        self._trace(recipe, config, explain_at=peak.peak)
        snap = self.last_tracker.snapshot or {}
        return sorted(((k, n, b) for k, (n, b) in snap.items()), key=lambda x: -x[2])[:top]

    def run_all(self, recipe: Recipe, configs: tuple[ConfigKind, ...] = PI_C) -> list[ConfigPeak]:
        """Estimates for each configuration."""
        return [self.run(recipe, c) for c in configs]


def _why(e: Exception) -> str:
    lines = str(e).strip().splitlines() or [""]
    return f"{type(e).__name__}: {lines[0][:200]}"


def _phase_peaks(phases: dict[str, PhasePeak]) -> dict[str, int]:
    return {k: v.peak for k, v in phases.items()}


def measure(
    unet: torch.nn.Module,
    spec: ModelSpec,
    recipe: Recipe,
    config: ConfigKind,
    shape: StepShape,
    guard: str | None = None,
) -> dict[str, int]:
    """Run the trainer's outer step on real CPU tensors and measure its peak memory.

    Two independent measurements: the CPU allocator's running total of bytes allocated while the
    step runs (from the profiler's allocation events) plus the bytes already held by the UNet,
    and the live-storage tracker on the real tensors (exact bytes, no rounding).

    Args:
        unet: a real UNet from `build_unet` on CPU (no adapter), with `recipe.weights` base weights.
        spec, recipe, config, shape, guard: as in `memplan.trainer.build_trainer`.

    Returns:
        {"allocator": bytes, "tracker": bytes, "weights": bytes}.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    weights = module_bytes(unet)
    tracker = StorageTracker(block=1)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with tracker:
            tracker.register(list(unet.parameters()) + list(unet.buffers()))
            trainer = build_trainer(unet, spec, recipe, config, shape, device="cpu", guard=guard)
            trainer_step(trainer)
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and str(node.extra_fields.device) == "cpu":
            f = node.extra_fields
            events.append((node.start_time_ns, f.total_allocated, f.alloc_size))
    # the running total carries what earlier profiles allocated and freed unprofiled: measure from
    # the total before this profile's first allocation
    events.sort()
    base = events[0][1] - events[0][2] if events else 0
    peak = max((total for _, total, _ in events), default=base) - base
    return {"allocator": weights + peak, "tracker": tracker.report().peak, "weights": weights}
