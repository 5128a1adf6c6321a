"""resalign_fast: resilient safety unlearning (ResAlign) for diffusion models.

Public API (small on purpose):
    ResAlignConfig      frozen configuration of a run (resalign_fast.config)
    richardson_solve    Richardson solver of (I + gamma H) v = b (resalign_fast.hypergrad)
    implicit_hypergrad  Moreau-envelope implicit hypergradient (resalign_fast.hypergrad)
"""

__version__ = "0.1.0"
