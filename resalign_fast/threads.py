"""How many CPU threads torch uses: the `num_threads` setting of train, finetune and evaluate.

0 (the default) measures on the user's machine instead of trusting ours: a few forward and
backward passes of a small convolution, as the digits UNet runs them, with one thread and with
torch's default; the faster wins. On our 2-core machine an outer step took 10 s with 1 thread and
over 8 minutes with 2 while another process held a core; on an idle many-core machine the default
is faster. The measurement takes well under a second and sees the load the machine has now.
"""

from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger("resalign_fast")


def _seconds(threads: int, reps: int = 3) -> float:
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 32, 16, 16, generator=g, requires_grad=True)
    w = torch.randn(32, 32, 3, 3, generator=g, requires_grad=True)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.nn.functional.conv2d(x, w, padding=1).square().sum().backward()
        best = min(best, time.perf_counter() - t0)
    return best


def set_threads(requested: int) -> int:
    """Set torch's CPU thread count: `requested` when > 0, else the faster of 1 and torch's default
    (measured now). Returns the count set."""
    if requested > 0:
        torch.set_num_threads(requested)
        return requested
    default = torch.get_num_threads()
    if default <= 1:
        return default
    many, one = _seconds(default), _seconds(1)
    pick = 1 if one <= many else default
    torch.set_num_threads(pick)
    log.info(
        "num_threads 0: %d thread(s) (measured %.1f ms with 1, %.1f ms with %d)",
        pick,
        one * 1e3,
        many * 1e3,
        default,
    )
    return pick
