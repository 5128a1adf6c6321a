"""Hypergradients of the ResAlign objective.

* ``solvers``: Richardson / CG / Neumann solvers of (I + gamma H) v = b and ``make_solver``.
* ``hvp``: Hessian-vector-product backends (exact, jvp, fd) via ``make_hvp``.
* ``implicit``: the Moreau-envelope implicit hypergradient ``implicit_hypergrad``.
* ``guard``: the reference guard ``guarded_hypergrad`` (halve alpha, retry, fall back).
* ``unrolled``: backpropagation through the simulated steps ``unrolled_hypergrad`` (checkpointed).
"""

from resalign_fast.hypergrad.guard import GuardInfo, guarded_hypergrad
from resalign_fast.hypergrad.hvp import make_hvp
from resalign_fast.hypergrad.implicit import implicit_hypergrad
from resalign_fast.hypergrad.solvers import cg_solve, make_solver, neumann_solve, richardson_solve
from resalign_fast.hypergrad.unrolled import unrolled_hypergrad

__all__ = [
    "GuardInfo",
    "cg_solve",
    "guarded_hypergrad",
    "implicit_hypergrad",
    "make_hvp",
    "make_solver",
    "neumann_solve",
    "richardson_solve",
    "unrolled_hypergrad",
]
