"""Recipes (how one outer step is computed) and the outer step itself, as the planner runs it.

One outer step for one fine-tuning configuration C (METHOD.md Algorithm 2):

1. "grads at theta": first-order gradients of the harmful loss and of the preservation loss at
   theta (the distillation target comes from one no-grad forward with the adapter disabled: the
   base weights serve as the frozen original model, no second copy).
2. "simulate": `sim_steps` plain optimizer steps on the LoRA parameters, or on every UNet
   parameter for full-parameter configs (their starting values are kept in a copy to restore;
   with `lean_full`, in host memory, and the optimizer steps inside the backward pass).
   DreamBooth configs run two forward passes (instance and prior batch) per step.
3. "hypergradient": b = lambda * grad L_h(theta*), then Richardson iterations on
   (I + gamma H) v = b with `make_hvp(..., backend=recipe.hvp)` at theta*.

The project's functions run when they exist (`resalign_fast.hypergrad.make_hvp` and
`richardson_solve`, `resalign_fast.inner.optim`, `resalign_fast.inner.inplace` for `lean_full`);
the local stand-ins below are used otherwise, and `sources()` says which ran. Nothing here reads a tensor's values (the step runs on meta
tensors too); the planner's own arithmetic never enters the estimate.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator

import torch
from torch import Tensor

from resalign_fast.memplan.attn import diff_order, use_attention
from resalign_fast.memplan.tracker import StorageTracker
from resalign_fast.memplan.unets import ModelSpec

HVP_BACKENDS = ("exact", "jvp", "fd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class FTConfig:
    """The memory-relevant part of a fine-tuning configuration C of pi(C).

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


PI_C: tuple[FTConfig, ...] = tuple(
    FTConfig(a, o, l) for a in ("lora", "full") for o in ("sgd", "adam") for l in ("standard", "dreambooth")
)


@dataclass(frozen=True)
class Recipe:
    """How the outer step is computed.

    Attributes:
        name: label in tables.
        hvp: HVP backend, "exact" (double backward), "jvp" (forward-over-reverse) or "fd".
        attention: "math", "chunked" or "fused" (see `resalign_fast.memplan.attn`).
        checkpointing: diffusers' (non-reentrant) gradient checkpointing of every block.
        weights: dtype of the frozen base weights ("fp32", "bf16", "fp16"); LoRA stays fp32.
        split_terms: DreamBooth losses are differentiated one term at a time (gradients
            accumulate; HVPs are summed term by term by `make_hvp`, an exact HVP rebuilding its
            graph per term), instead of holding both forward graphs at once (the trainer's
            config field of the same name).
        chunk: query rows per attention chunk.
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
    chunk: int = 1024
    lean_full: bool = False
    offload_state: bool = False
    guard: str = "stable"


REFERENCE = Recipe("reference", hvp="exact", attention="math", checkpointing=False, split_terms=False,
                   guard="reference")


@dataclass(frozen=True)
class StepShape:
    """Sizes of one outer step.

    Attributes:
        batch: images per forward pass.
        resolution: image side in pixels.
        iters: Richardson iterations K (K - 1 HVPs from v_0 = 0).
        sim_steps: simulated optimizer steps (2 reach the steady state; more repeat it).
        lam, gamma, alpha: ResAlign's lambda, the proximal gamma and the Richardson step.
    """

    batch: int = 1
    resolution: int = 512
    iters: int = 5
    sim_steps: int = 2
    lam: float = 0.8
    gamma: float = 1.0
    alpha: float = 1.0


# -- the project's functions, or stand-ins ---------------------------------------------------
def _has(mod: str) -> bool:
    try:
        return importlib.util.find_spec(mod) is not None
    except ModuleNotFoundError:
        return False


def sources() -> dict[str, str]:
    """Which implementation each part of the step uses: the project's module or a stand-in."""
    return {
        "hvp": "resalign_fast.hypergrad.hvp" if _has("resalign_fast.hypergrad.hvp") else "stand-in",
        "solver": "resalign_fast.hypergrad.solvers" if _has("resalign_fast.hypergrad.solvers") else "stand-in",
        "optimizer": "resalign_fast.inner.optim" if _has("resalign_fast.inner.optim") else "torch.optim",
        "attention": "resalign_fast.models.attention" if _has("resalign_fast.models.attention") else "missing",
        "checkpointing": ("resalign_fast.models.checkpointing" if _has("resalign_fast.models.checkpointing")
                          else "diffusers"),
    }


def _make_hvp(loss_fn, params, backend, inplace=False):
    if _has("resalign_fast.hypergrad.hvp"):
        from resalign_fast.hypergrad.hvp import make_hvp

        return make_hvp(loss_fn, params, backend=backend, inplace=inplace)
    raise RuntimeError("resalign_fast.hypergrad.hvp is missing (no stand-in: it landed first)")


def _richardson(hvp, b, shape: StepShape, guard: str = "stable", device=None) -> list[Tensor]:
    """The trainer's solve: guard "stable", power iteration for the step, then Richardson from
    v_0 = b (`hypergrad.stable`); "reference" (and the local stand-in), the plain iteration from 0."""
    if guard == "reference" and _has("resalign_fast.hypergrad.solvers"):
        from resalign_fast.hypergrad.solvers import richardson_solve

        return richardson_solve(hvp, b, alpha=shape.alpha, gamma=shape.gamma, iters=shape.iters)
    if _has("resalign_fast.hypergrad.stable"):
        from resalign_fast.hypergrad.stable import stable_solve

        return stable_solve(hvp, b, gamma=shape.gamma, iters=shape.iters, device=device)[0]
    v = [torch.zeros_like(t) for t in b]  # LOCAL STAND-IN: v_{k+1} = v_k + a (b - v_k - g H v_k)
    for _ in range(shape.iters):
        hv = hvp(v)
        v = [vi + shape.alpha * (bi - vi - shape.gamma * h) for vi, bi, h in zip(v, b, hv)]
    return v


class _Optimizer:
    """In-place optimizer steps: `resalign_fast.inner.optim` when present, else torch.optim."""

    def __init__(self, name: str, params: list[Tensor]) -> None:
        self.params = params
        if _has("resalign_fast.inner.optim"):
            from resalign_fast.inner import optim

            self._spec = optim.OptimSpec(name, lr=1e-5)
            self._state = optim.init_state(self._spec, params)
            self._step = optim.step_
            self._torch = None
        else:
            cls = torch.optim.SGD if name == "sgd" else torch.optim.Adam
            self._torch = cls(params, lr=1e-5, foreach=False)

    def step(self) -> None:
        grads = [p.grad for p in self.params]
        if self._torch is not None:
            self._torch.step()
        else:
            with torch.no_grad():
                self._step(self._spec, self.params, grads, self._state)
        for p in self.params:
            p.grad = None


@contextlib.contextmanager
def host_allocations(host: Callable[[], ContextManager] | None) -> Iterator[None]:
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


# -- the step ------------------------------------------------------------------------------
Batch = tuple[Tensor, Tensor, Tensor, Tensor]


def make_batch(spec: ModelSpec, shape: StepShape, device: torch.device | str = "cpu") -> Batch:
    """Cached inputs of one forward: latents, noise, timesteps, prompt embeddings.

    Returns:
        (x0 (B, 4, r, r), noise (B, 4, r, r), t (B,) int64, emb (B, L, D)); fp32.
    """
    lat = spec.latent_shape(shape.batch, shape.resolution)
    return (torch.randn(lat, device=device), torch.randn(lat, device=device),
            torch.randint(0, 1000, (shape.batch,), device=device),
            torch.randn(spec.text_shape(shape.batch), device=device))


def _eps(unet, batch: Batch, params: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    x0, noise, t, emb = batch
    dtype = unet.dtype
    noisy = (0.9 * x0 + 0.4 * noise).to(dtype)
    args, kw = (noisy, t), {"encoder_hidden_states": emb.to(dtype), "return_dict": False}
    out = unet(*args, **kw) if params is None else torch.func.functional_call(unet, params, args, kw)
    return out[0].float(), noise


def denoise_loss(unet, batch: Batch, params: dict[str, Tensor] | None = None) -> Tensor:
    """Standard denoising loss ||eps_theta(x_t, t, e) - noise||^2 (mean).

    Written as (a - b).square().mean(): F.mse_loss breaks forward-over-reverse HVPs in torch
    (pytorch/pytorch#123996).
    """
    pred, noise = _eps(unet, batch, params)
    return (pred - noise).square().mean()


@contextlib.contextmanager
def _adapter_disabled(unet) -> Iterator[None]:
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


def _ft_terms(unet, C: FTConfig, ft: Batch, prior: Batch) -> list[Callable[..., Tensor]]:
    """Loss terms of the fine-tuning objective, each `term(params_dict_or_None) -> loss`."""
    terms = [lambda p=None: denoise_loss(unet, ft, p)]
    if C.loss == "dreambooth":
        terms.append(lambda p=None: denoise_loss(unet, prior, p))
    return terms


def _backward_terms(terms, split: bool) -> None:
    """Accumulate d(sum of terms)/d(params) into .grad, term by term or all at once."""
    if split:
        for term in terms:
            term().backward()
    else:
        sum(term() for term in terms).backward()


class OuterStep:
    """One outer step of `recipe`, phase by phase, on `unet`.

    The phases can also run alone from the state the previous ones leave (`state_before`), which
    lets the estimator trace each phase once for all the configurations that share it.

    Args:
        unet: UNet from `build_unet` (LoRA adapter "default" on every attention layer).
        spec: its model spec (input shapes).
        recipe: how to compute the step.
        shape: sizes.
        tracker: phases are labelled on it when given.
        device: where inputs are created.
    """

    def __init__(self, unet, spec: ModelSpec, recipe: Recipe, shape: StepShape,
                 tracker: StorageTracker | None = None, device: torch.device | str = "cpu") -> None:
        if recipe.hvp not in HVP_BACKENDS:
            raise ValueError(f"unknown hvp backend {recipe.hvp!r}; choose one of {HVP_BACKENDS}")
        self.unet, self.spec, self.recipe, self.shape, self.device = unet, spec, recipe, shape, device
        if recipe.lean_full and recipe.hvp != "fd":
            raise ValueError("lean_full runs fd HVPs only")
        self.tracker = tracker
        self._phase = tracker.phase if tracker is not None else (lambda name: contextlib.nullcontext())
        self.named = dict(unet.named_parameters())
        self.lora = [n for n in self.named if "lora_" in n]
        if recipe.checkpointing and _has("resalign_fast.models.checkpointing"):
            from resalign_fast.models.checkpointing import enable_checkpointing

            enable_checkpointing(unet)  # re-binds functional_call's tensors when it recomputes
        elif recipe.checkpointing:
            unet.enable_gradient_checkpointing()  # non-reentrant; wrong values under functional_call
        else:
            unet.disable_gradient_checkpointing()
        # cached latents and text embeddings: harmful, preservation, fine-tuning, prior batches
        self.harm, self.pres, self.ft, self.prior = (make_batch(spec, shape, device) for _ in range(4))

    def _train_names(self, C: FTConfig) -> list[str]:
        return list(self.named) if C.algo == "full" else self.lora

    def _terms(self, C: FTConfig) -> list[Callable[..., Tensor]]:
        return _ft_terms(self.unet, C, self.ft, self.prior)

    def _lean(self, C: FTConfig) -> bool:
        return self.recipe.lean_full and C.algo == "full"

    def _ft_loss(self, C: FTConfig) -> Callable[[], Tensor]:
        terms = self._terms(C)
        return lambda: sum(t() for t in terms)

    def attention(self):
        """Context manager putting the recipe's attention into the UNet."""
        return use_attention(self.unet, self.recipe.attention, self.recipe.chunk)

    def grads_at_theta(self) -> tuple[list[Tensor], list[Tensor]]:
        """Phase 1: first-order grads of L_h and of R at theta (adapter off for the teacher)."""
        unet, theta = self.unet, [self.named[n] for n in self.lora]
        with self._phase("grads at theta"):
            g_h = torch.autograd.grad(-denoise_loss(unet, self.harm), theta)
            with torch.no_grad(), _adapter_disabled(unet):
                eps0, _ = _eps(unet, self.pres)
            pred, _ = _eps(unet, self.pres)
            g_r = torch.autograd.grad((pred - eps0).square().mean(), theta)
        return list(g_h), list(g_r)

    def simulate(self, C: FTConfig) -> list[Tensor]:
        """Phase 2: plain optimizer steps from theta; returns the backup of the starting values
        (a list that `hypergradient` empties once it has restored them)."""
        params = [self.named[n] for n in self._train_names(C)]
        terms = self._terms(C)
        with self._phase("simulate"):
            if self._lean(C):
                from resalign_fast.inner import optim
                from resalign_fast.inner.inplace import host_backup, simulate_inplace

                with host_allocations(None if self.tracker is None else self.tracker.host):
                    backup = host_backup(params)
                    for p in params:
                        p.requires_grad_(True)
                    simulate_inplace(params, self._ft_loss(C), optim.OptimSpec(C.optim, lr=1e-5), self.shape.sim_steps,
                                     offload=self.recipe.offload_state)
                return backup
            backup = [p.detach().clone() for p in params]
            for p in params:
                p.requires_grad_(True)
            opt = _Optimizer(C.optim, params)
            for _ in range(self.shape.sim_steps):
                _backward_terms(terms, self.recipe.split_terms and len(terms) > 1)
                opt.step()
            del opt
        return backup

    def hypergradient(self, C: FTConfig, backup: list[Tensor]) -> list[Tensor]:
        """Phase 3: v_K of (I + gamma H) v = lambda grad L_h at theta*, then restore theta from
        `backup` (emptied).

        Returns:
            v_K restricted to theta (LoRA-shaped tensors).
        """
        shape = self.shape
        train = self._train_names(C)
        params = [self.named[n] for n in train]
        host = None if self.tracker is None else self.tracker.host
        with self._phase("hypergradient"), host_allocations(host):
            g = list(torch.autograd.grad(-shape.lam * denoise_loss(self.unet, self.harm), params))
            if self._lean(C) and self.recipe.guard == "stable":  # as the trainer: b waits in host memory
                from resalign_fast.inner.inplace import host_backup

                g = host_backup(g)
            v = self._solve(C, train, params, g)
            del g
            from resalign_fast.inner.inplace import restore

            restore(params, backup)
            for n, p in zip(train, params):
                p.requires_grad_("lora_" in n)
            v_theta = [v[train.index(n)] for n in self.lora]
            del v
        return v_theta

    def _solve(self, C: FTConfig, train: list[str], params: list[Tensor], b: list[Tensor]) -> list[Tensor]:
        """Richardson with the project's `make_hvp` of the fine-tuning loss at theta* (in place on the
        module's parameters for lean full-parameter configurations)."""
        recipe, lean = self.recipe, self._lean(C)
        if lean:  # the terms read the module's parameters, which the in-place HVP perturbs
            fns = [lambda ps, t=t: t() for t in self._terms(C)]
        else:
            fns = [lambda ps, t=t: t(dict(zip(train, ps))) for t in self._terms(C)]
        loss = fns if recipe.split_terms else (lambda ps: sum(fn(ps) for fn in fns))
        with diff_order(1 if recipe.hvp == "fd" else 2):
            hvp = _make_hvp(loss, params, recipe.hvp, inplace=lean)
            return _richardson(hvp, b, self.shape, recipe.guard, params[0].device if lean else None)

    def state_before(self, phase: str, C: FTConfig) -> dict[str, list[Tensor]]:
        """Tensors alive when `phase` starts in a full step (allocated here, values unset).

        Args:
            phase: "grads at theta", "simulate" or "hypergradient".
            C: the configuration.

        Returns:
            {"grads": the two LoRA-shaped gradients (after phase 1), "backup": starting values
            of the simulated parameters (before phase 3)}; keep it alive while the phase runs.
        """
        theta = [self.named[n] for n in self.lora]
        state: dict[str, list[Tensor]] = {}
        if phase in ("simulate", "hypergradient"):
            state["grads"] = [torch.empty_like(p) for p in theta + theta]
        if phase == "hypergradient":
            host = self.tracker.host() if self._lean(C) and self.tracker else contextlib.nullcontext()
            with host:
                state["backup"] = [self.named[n].detach().clone() for n in self._train_names(C)]
            for n in self._train_names(C):
                self.named[n].requires_grad_(True)
        return state

    def run(self, C: FTConfig) -> list[Tensor]:
        """The whole outer step for configuration C; returns the hypergradient on theta."""
        with self.attention():
            g_h, g_r = self.grads_at_theta()
            backup = self.simulate(C)
            v = self.hypergradient(C, backup)
            return [(1 - self.shape.lam) * a + b + c for a, b, c in zip(g_h, g_r, v)]


def outer_step(unet, spec: ModelSpec, recipe: Recipe, C: FTConfig, shape: StepShape,
               tracker: StorageTracker | None = None, device: torch.device | str = "cpu") -> list[Tensor]:
    """Run one outer step of `recipe` for configuration C (see `OuterStep`).

    Returns:
        The hypergradient on theta (LoRA-shaped tensors).
    """
    return OuterStep(unet, spec, recipe, shape, tracker, device).run(C)
