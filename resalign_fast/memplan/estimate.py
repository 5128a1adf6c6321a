"""Estimate (meta tensors, nothing runs) and measure (real tensors, CPU allocator) a step's peak.

`Estimator` builds the UNet on the meta device (no weights, no memory), runs the real outer step
on meta tensors under a `StorageTracker` and reports the peak of live storage bytes. `measure` runs
the same `outer_step` on real tensors and reads the peak from the CPU allocator itself (the
profiler's allocation events carry the allocator's running total), so the two are independent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from resalign_fast.memplan.recipes import DTYPES, PI_C, FTConfig, OuterStep, Recipe, StepShape, outer_step
from resalign_fast.memplan.tracker import CUDA_BLOCK, PhasePeak, StorageTracker, module_bytes
from resalign_fast.memplan.meta import MetaOpCache, reference_ops, sdpa_as
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
    """Traces outer steps on a meta UNet; one UNet per weight dtype is built and reused.

    Args:
        model: a key of `MODELS` or a `ModelSpec`.
        shape: batch, resolution and iteration counts.
        block: allocator rounding in bytes (512: CUDA caching allocator; 1: exact).
        target: device whose fused attention kernels are modelled, "cuda" or "cpu".
    """

    def __init__(self, model: str | ModelSpec = "sd-v1-4", shape: StepShape = StepShape(),
                 block: int = CUDA_BLOCK, target: str = "cuda") -> None:
        if isinstance(model, str):
            if model not in MODELS:
                raise ValueError(f"unknown model {model!r}; known: {sorted(MODELS)}")
            model = MODELS[model]
        self.spec, self.shape, self.block, self.target = model, shape, block, target
        self._unets: dict[str, torch.nn.Module] = {}
        self._memo: dict[tuple, tuple[int, float, str]] = {}
        self.cache = True
        self._cache = MetaOpCache()

    def unet(self, weights: str) -> torch.nn.Module:
        """The meta UNet with `weights`-dtype base weights (built on first use)."""
        if weights not in DTYPES:
            raise ValueError(f"unknown weights dtype {weights!r}; choose one of {sorted(DTYPES)}")
        if weights not in self._unets:
            with torch.device("meta"):
                self._unets[weights] = build_unet(self.spec, dtype=DTYPES[weights])
        return self._unets[weights]

    def _trace(self, recipe: Recipe, fn, explain_at: int | None = None) -> tuple[object, float]:
        """Run fn(unet, tracker) on the meta UNet under a fresh tracker; (report, seconds)."""
        unet = self.unet(recipe.weights)
        tracker = StorageTracker(self.block, fake_scalars=True, run_op=self._cache if self.cache else None,
                                 explain_at=explain_at)
        self.last_tracker = tracker
        t0 = time.perf_counter()
        try:
            with reference_ops(), sdpa_as(self.target), tracker:
                tracker.register(list(unet.parameters()) + list(unet.buffers()))
                fn(unet, tracker)
        finally:
            _reset(unet)
        return tracker.report(), time.perf_counter() - t0

    def run(self, recipe: Recipe, config: FTConfig) -> ConfigPeak:
        """Estimated peak of one whole outer step of `recipe` for `config`, traced in one go."""
        def fn(unet, tracker):
            outer_step(unet, self.spec, recipe, config, self.shape, tracker, device="meta")

        try:
            rep, sec = self._trace(recipe, fn)
        except Exception as e:  # a recipe that cannot run a config is reported, not fatal
            return ConfigPeak(config.name, None, error=_why(e))
        return ConfigPeak(config.name, rep.peak, rep.peak_phase, _phase_peaks(rep.phases),
                          module_bytes(self.unet(recipe.weights), self.block), seconds=sec)

    def explain(self, recipe: Recipe, config: FTConfig, top: int = 12) -> list[tuple[str, int, int]]:
        """What is live at the peak of `recipe` on `config`: the `top` groups of storages by the
        operator (and phase), shape and dtype that allocated them, largest first.

        Returns:
            [(label, count, bytes)]; "registered" labels the UNet's weights and buffers.
        """
        peak = self.run(recipe, config)
        if peak.peak is None:
            raise RuntimeError(f"{recipe.name} on {config.name} does not run: {peak.error}")

        def fn(unet, tracker):
            outer_step(unet, self.spec, recipe, config, self.shape, tracker, device="meta")

        self._trace(recipe, fn, explain_at=peak.peak)
        snap = self.last_tracker.snapshot or {}
        return sorted(((k, n, b) for k, (n, b) in snap.items()), key=lambda x: -x[2])[:top]

    def run_phases(self, recipe: Recipe, config: FTConfig) -> ConfigPeak:
        """Like `run`, but each phase is traced alone, from the state the earlier phases leave,
        and reused by every (recipe, config) that runs the same phase the same way.

        The peak of a step is the largest phase peak; tests check that this equals `run`.
        """
        phases: dict[str, int] = {}
        seconds = 0.0
        for phase in PHASES:
            key = _phase_key(phase, recipe, config)
            if key not in self._memo:
                self._memo[key] = self._trace_phase(recipe, config, phase)
            peak, sec, err = self._memo[key]
            seconds += sec
            if err:
                return ConfigPeak(config.name, None, error=f"{phase}: {err}", seconds=seconds)
            phases[phase] = peak
        top = max(phases, key=phases.get)
        return ConfigPeak(config.name, phases[top], top, phases,
                          module_bytes(self.unet(recipe.weights), self.block), seconds=seconds)

    def _trace_phase(self, recipe: Recipe, config: FTConfig, phase: str) -> tuple[int, float, str]:
        def fn(unet, tracker):
            step = OuterStep(unet, self.spec, recipe, self.shape, tracker, device="meta")
            state = step.state_before(phase, config)
            with step.attention():
                if phase == "grads at theta":
                    step.grads_at_theta()
                elif phase == "simulate":
                    step.simulate(config)
                else:
                    step.hypergradient(config, state.pop("backup"))
            del state

        try:
            rep, sec = self._trace(recipe, fn)
        except Exception as e:
            return 0, 0.0, _why(e)
        return rep.phases[phase].peak, sec, ""

    def run_project(self, recipe: Recipe, config: FTConfig, guard: str | None = None) -> ConfigPeak:
        """Estimated peak of the project's own outer step (`memplan.project`) for `config`.

        A fresh meta UNet is built each time (the trainer adds its adapter and settings to it).
        `guard`: the trainer's config field of that name (None: its default).
        """
        from resalign_fast.memplan.project import available, project_step

        why = available()
        if why:
            return ConfigPeak(config.name, None, error=f"resalign_fast.bilevel unavailable: {why}")
        with torch.device("meta"):
            unet = build_unet(self.spec, dtype=DTYPES[recipe.weights], lora_rank=0)
        tracker = StorageTracker(self.block, fake_scalars=True, run_op=self._cache if self.cache else None)
        t0 = time.perf_counter()
        try:
            with reference_ops(), sdpa_as(self.target), tracker:
                tracker.register(list(unet.parameters()) + list(unet.buffers()))
                project_step(unet, self.spec, recipe, config, self.shape, host=tracker.host, guard=guard)
        except Exception as e:
            return ConfigPeak(config.name, None, error=_why(e), seconds=time.perf_counter() - t0)
        rep = tracker.report()
        return ConfigPeak(config.name, rep.peak, rep.peak_phase, {}, module_bytes(unet, self.block),
                          seconds=time.perf_counter() - t0)

    def run_all(self, recipe: Recipe, configs: tuple[FTConfig, ...] = PI_C,
                memo: bool = True) -> list[ConfigPeak]:
        """Estimates for each configuration (`run_phases` when memo, else `run`)."""
        return [(self.run_phases if memo else self.run)(recipe, c) for c in configs]


PHASES = ("grads at theta", "simulate", "hypergradient")


def _phase_key(phase: str, recipe: Recipe, c: FTConfig) -> tuple:
    """What a phase's memory depends on (LR and step count never matter)."""
    base = (phase, recipe.weights, recipe.attention, recipe.checkpointing, recipe.chunk,
            recipe.lean_full and c.algo == "full", recipe.guard)
    split = recipe.split_terms and c.loss == "dreambooth"
    if phase == "grads at theta":
        return base
    if phase == "simulate":
        return base + (c.algo, c.optim, c.loss, split, recipe.offload_state and c.algo == "full")
    return base + (recipe.hvp, c.algo, c.loss, split)  # the optimizer state is gone by then


def _why(e: Exception) -> str:
    lines = str(e).strip().splitlines() or [""]
    return f"{type(e).__name__}: {lines[0][:200]}"


def _phase_peaks(phases: dict[str, PhasePeak]) -> dict[str, int]:
    return {k: v.peak for k, v in phases.items()}


def _reset(unet: torch.nn.Module) -> None:
    """Undo what a failed step may have left: grads, trainable base weights."""
    for n, p in unet.named_parameters():
        p.grad = None
        p.requires_grad_("lora_" in n)
    unet.enable_adapters()


def measure(unet: torch.nn.Module, spec: ModelSpec, recipe: Recipe, config: FTConfig,
            shape: StepShape) -> dict[str, int]:
    """Run one outer step on real CPU tensors and measure its peak memory.

    Two independent measurements: the CPU allocator's running total of bytes allocated while the
    step runs (from the profiler's allocation events) plus the bytes already held by the UNet,
    and the live-storage tracker on the real tensors (exact bytes, no rounding).

    Args:
        unet: a real UNet from `build_unet` on CPU, with `recipe.weights` base weights.
        spec, recipe, config, shape: as in `outer_step`.

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
            outer_step(unet, spec, recipe, config, shape, tracker)
    peak, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and str(node.extra_fields.device) == "cpu":
            peak = max(peak, node.extra_fields.total_allocated)
    return {"allocator": weights + peak, "tracker": tracker.report().peak, "weights": weights}
