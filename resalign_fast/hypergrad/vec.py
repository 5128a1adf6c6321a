"""Reductions over lists of tensors (a vector in a parameter space), accumulated in fp64 and
returned as Python floats with one host sync: the norms and dots of the solvers, the guards and the
HVP step size. Device-side, differentiable reductions (CG's alpha) stay where they are used."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["dot", "norm", "norm_sq"]


def norm_sq(ts: Sequence[Tensor]) -> float:
    """sum_i ||t_i||^2 in fp64."""
    return float(torch.stack([t.detach().square().sum(dtype=torch.float64) for t in ts]).sum())


def norm(ts: Sequence[Tensor]) -> float:
    """The Euclidean norm of the concatenated tensors (fp64 accumulation)."""
    return math.sqrt(norm_sq(ts))


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """sum_i <a_i, b_i> in fp64."""
    return float(
        torch.stack([(x.detach().double() * y.detach().double()).sum() for x, y in zip(a, b)]).sum()
    )
