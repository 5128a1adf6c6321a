"""Live-storage tracking: the peak bytes of tensor storages while code runs.

`StorageTracker` is a `TorchDispatchMode`. Every tensor an operator returns has its storage
registered once (keyed by the storage's C++ address); a `weakref.finalize` on the storage's Python
object (PyTorch keeps that object alive exactly as long as the C++ storage lives) releases it. The
running total and its maximum are the live and peak bytes.

It works the same on real tensors (a measurement) and on fake or meta tensors (an estimate without
running anything), which is what makes the estimate checkable on CPU.

Allocator model (CUDA caching allocator, roughly): each storage is rounded up to `block` bytes
(512 on CUDA). Ignored: fragmentation and the 2 MiB / 20 MiB segment granularity (they show up in
`torch.cuda.memory_reserved`, not in `max_memory_allocated`), operator workspaces that do not go
through the caching allocator, cuBLAS/cuDNN handles and the CUDA context (about 0.5 GiB).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CUDA_BLOCK = 512  # bytes: the CUDA caching allocator rounds every request up to a multiple of 512


@dataclass
class PhasePeak:
    """Peak of one named phase.

    Attributes:
        peak: highest live bytes while the phase ran.
        start: live bytes when the phase began.
    """

    peak: int = 0
    start: int = 0


@dataclass
class TrackerReport:
    """What a tracked run left behind.

    Attributes:
        peak: highest live bytes over the whole run.
        peak_phase: the phase that was running at the peak.
        phases: per-phase peaks, in the order the phases first ran.
        baseline: live bytes registered before any operator ran (weights, inputs).
    """

    peak: int
    peak_phase: str
    phases: dict[str, PhasePeak] = field(default_factory=dict)
    baseline: int = 0


class StorageTracker(TorchDispatchMode):
    """Tracks the bytes of live tensor storages created while the mode is active.

    Args:
        block: allocation granularity in bytes; each storage is rounded up to a multiple of it.
            512 models the CUDA caching allocator; 1 counts exact bytes.
        fake_scalars: answer every data-dependent scalar read (``.item()``, ``float(t)``,
            ``bool(t)``) of a meta tensor with 1 instead of running it. Meta tensors have no values,
            and code such as a norm check or an adaptive finite-difference step reads some; with 1
            the traced control flow is the common path (no zero vector, no guard retry).
        run_op: runs an operator, `run_op(func, args, kwargs) -> outputs`; default calls it
            (`meta.MetaOpCache` memoises meta kernels).
        explain_at: when live bytes first reach this value, `snapshot` records what is live,
            grouped by the operator, shape and dtype that allocated it (pass a known peak).

    Example:
        >>> with StorageTracker() as tr:
        ...     tr.register(model.parameters())
        ...     loss = model(x).sum(); loss.backward()
        >>> tr.report().peak
    """

    def __init__(
        self,
        block: int = CUDA_BLOCK,
        fake_scalars: bool = False,
        run_op: Callable[[Any, tuple, dict], Any] | None = None,
        explain_at: int | None = None,
    ) -> None:
        super().__init__()
        self.explain_at = explain_at
        self.snapshot: dict[str, tuple[int, int]] | None = None  # label -> (count, bytes)
        self._labels: dict[int, str] = {}
        self._op = "registered"
        self.fake_scalars = fake_scalars
        self.run_op = run_op
        if block < 1:
            raise ValueError(f"block must be >= 1 byte, got {block}")
        self.block = block
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        self._phase = "setup"
        self._peak_phase = "setup"
        self._phases: dict[str, PhasePeak] = {}
        self._baseline = 0
        self._ran_op = False
        self._host = False
        self._host_keys: set[int] = set()

    # -- registration -----------------------------------------------------------------------
    def _rounded(self, nbytes: int) -> int:
        return -(-nbytes // self.block) * self.block

    def _release(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)
        self._labels.pop(key, None)

    def register(self, tensors: Iterable[Any] | torch.Tensor) -> None:
        """Count tensors that already exist (weights, inputs, buffers) as live.

        Args:
            tensors: a tensor or any pytree of tensors; non-tensors are skipped.
        """
        for t in tree_leaves(tensors if not isinstance(tensors, Iterator) else list(tensors)):
            if isinstance(t, torch.Tensor):
                self._track(t)
        if not self._ran_op:
            self._baseline = self.live

    def _track(self, t: torch.Tensor) -> None:
        if t.is_sparse or t.layout != torch.strided:
            return
        try:
            st = t.untyped_storage()
        except (NotImplementedError, RuntimeError):  # tensors without storage (functorch wrappers)
            return
        key = st._cdata
        if key in self._sizes or key in self._host_keys:
            return
        if self._host:
            self._host_keys.add(key)
            weakref.finalize(st, self._host_keys.discard, key)
            return
        size = self._rounded(st.nbytes())
        if size == 0:
            return
        self._sizes[key] = size
        weakref.finalize(st, self._release, key)
        self.live += size
        if self.explain_at is not None:
            self._labels[key] = f"{self._op} {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
            if self.snapshot is None and self.live >= self.explain_at:
                self.snapshot = {}
                for k, lab in self._labels.items():
                    n, b = self.snapshot.get(lab, (0, 0))
                    self.snapshot[lab] = (n + 1, b + self._sizes[k])
        if self.live > self.peak:
            self.peak = self.live
            self._peak_phase = self._phase
        ph = self._phases.get(self._phase)
        if ph is not None and self.live > ph.peak:
            ph.peak = self.live

    @contextlib.contextmanager
    def host(self) -> Iterator[None]:
        """Storages created inside the block live in host memory: they are not counted.

        For estimates on meta tensors of code that keeps a copy off the GPU (on the GPU it would
        be `.to("cpu")`); views and in-place updates of them stay uncounted too.
        """
        prev, self._host = self._host, True
        try:
            yield
        finally:
            self._host = prev

    # -- phases -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Attribute allocations (and the peak) to a named phase while the block runs.

        Args:
            name: phase label; a repeated name keeps the maximum over its runs.
        """
        prev = self._phase
        self._phase = name
        ph = self._phases.setdefault(name, PhasePeak(peak=self.live, start=self.live))
        ph.peak = max(ph.peak, self.live)
        try:
            yield
        finally:
            self._phase = prev

    def report(self) -> TrackerReport:
        """Return the peak, the phase it fell in and the per-phase peaks."""
        return TrackerReport(self.peak, self._peak_phase, dict(self._phases), self._baseline)

    # -- dispatch ---------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        self._ran_op = True
        if (
            self.fake_scalars
            and func is torch.ops.aten._local_scalar_dense.default
            and args[0].device.type == "meta"
        ):
            dtype = args[0].dtype
            return True if dtype == torch.bool else (1.0 if dtype.is_floating_point else 1)
        if self.explain_at is not None:
            self._op = f"{self._phase}: {func.__name__}"
        if (
            func is torch.ops.aten._to_copy.default
            and args[0].device.type == "meta"
            and torch.device((kwargs or {}).get("device") or "meta").type == "cpu"
        ):
            # a copy to host memory (x.to("cpu"), x.cpu()) of a meta tensor: meta data cannot be
            # copied out, so it is answered with a CPU tensor of that shape holding no memory (one
            # zero, expanded); host memory is not counted, and a copy back is a new device tensor
            dtype = (kwargs or {}).get("dtype") or args[0].dtype
            return torch.zeros((), dtype=dtype).expand(args[0].shape)
        if self.run_op is None:
            out = func(*args, **(kwargs or {}))
        else:
            out = self.run_op(func, args, kwargs or {})
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def module_bytes(module: torch.nn.Module, block: int = 1) -> int:
    """Bytes held by a module's parameters and buffers (shared storages counted once).

    Args:
        module: any module; fake, meta or real tensors.
        block: allocation granularity, as in `StorageTracker`.
    """
    seen: dict[int, int] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        st = t.untyped_storage()
        seen[st._cdata] = -(-st.nbytes() // block) * block
    return sum(seen.values())
