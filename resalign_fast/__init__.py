"""resalign_fast: resilient safety unlearning (ResAlign) for diffusion models.

Public API (small on purpose):
    ResAlignConfig      frozen configuration of a run (resalign_fast.config)
    richardson_solve    Richardson solver of (I + gamma H) v = b (resalign_fast.hypergrad)
    implicit_hypergrad  Moreau-envelope implicit hypergradient (resalign_fast.hypergrad)

They are imported on first use, so that `import resalign_fast` (and every `python -m
resalign_fast.<command>`) does not pay for torch before it needs it.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
__all__ = ["ResAlignConfig", "implicit_hypergrad", "richardson_solve"]

_HOME = {
    "ResAlignConfig": "resalign_fast.config",
    "implicit_hypergrad": "resalign_fast.hypergrad",
    "richardson_solve": "resalign_fast.hypergrad",
}


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'resalign_fast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
