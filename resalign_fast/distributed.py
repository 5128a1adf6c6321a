"""Scale-out over torch.distributed: the k sampled fine-tuning configurations of an outer step are
spread across ranks and their hypergradients reduced explicitly (DDP does not synchronise gradients
of gradients, and the hypergradient is not a plain backward pass anyway).

    torchrun --standalone --nproc_per_node N -m resalign_fast.train [flags]

Every rank holds theta and the data, computes the shared direct gradient, and runs the
configurations ``i`` with ``i % N == rank``. Each configuration draws from its own generator seeded
by (seed, step, i) (bilevel.py), so g_i does not depend on which rank computes it.

The reduction is a gather, not an all_reduce: every rank receives every g_i and sums them in
configuration order, ``((0 + g_0) + g_1) + ... + g_{k-1}``, then divides by k: exactly the
operations of the single-process loop. The result is therefore bit-identical to one process with the
same seed and configurations (fp addition is not associative, so a tree all_reduce would differ in
the last bits), and identical on every rank, so the replicas of theta never drift apart. The gather
runs one parameter tensor at a time: the transient memory is N * ceil(k/N) copies of the largest
tensor of theta, not of all of theta.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """The process group a run uses (world_size 1: no torch.distributed at all).

    Attributes:
        rank: this process's rank. world_size: number of processes. local_rank: rank on this node.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def indices(self, k: int) -> list[int]:
        """The configuration indices (of 0..k-1) this rank computes: i % world_size == rank."""
        return list(range(self.rank, k, self.world_size))

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable, small), in rank order."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def any_flag(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on some rank (for agreeing on errors)."""
        return any(self.gather_objects(bool(flag)))

    def reduce_config_grads(
        self, local: dict[int, list[torch.Tensor]], k: int, like: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Sum of the k per-configuration gradients, in configuration order, on every rank.

        Args:
            local: {i: g_i} for this rank's configurations (`indices(k)`), each a list shaped like
                `like`.
            k: number of configurations of the step.
            like: theta's tensors (shapes, dtypes, devices of the result).

        Returns:
            [sum_i g_i[j] for each tensor j], summed as ((0 + g_0) + g_1) + ... (see the module
            doc).
        """
        if not self.enabled:
            total = [torch.zeros_like(p) for p in like]
            for i in range(k):
                for acc, x in zip(total, local[i]):
                    acc.add_(x)
            return total
        m = math.ceil(k / self.world_size)
        mine = self.indices(k)
        total = []
        for j, p in enumerate(like):
            send = torch.zeros((m, *p.shape), dtype=p.dtype, device=p.device)
            for slot, i in enumerate(mine):
                send[slot].copy_(local[i][j])
            recv = [torch.empty_like(send) for _ in range(self.world_size)]
            dist.all_gather(recv, send)
            acc = torch.zeros_like(p)
            for i in range(k):
                acc.add_(recv[i % self.world_size][i // self.world_size])
            total.append(acc)
        return total


_CTX: DistContext | None = None


def setup(device: str = "auto") -> DistContext:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK in the environment).

    Without those variables (a plain `python -m ...`) returns a world of one and touches nothing.
    The backend is NCCL when the run uses CUDA, gloo otherwise; on CUDA the rank's device is
    cuda:LOCAL_RANK (so `--device auto` / `cuda` pick it).
    """
    global _CTX
    if _CTX is not None:
        return _CTX
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _CTX = DistContext()
        return _CTX
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    _CTX = DistContext(rank, world, local)
    return _CTX


def teardown() -> None:
    """Leave the process group (no-op for a world of one)."""
    global _CTX
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CTX = None


def context() -> DistContext:
    """The current context (a world of one before `setup`)."""
    return _CTX or DistContext()
