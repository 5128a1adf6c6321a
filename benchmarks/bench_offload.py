"""Time cost of `offload_optimizer_state`: in-place full-parameter simulation (`simulate_inplace`)
with the optimizer state on the device against the same with it in host memory, in one run.

    python benchmarks/bench_offload.py [--model sd-small|sd14] [--steps 3] [--reps 5] [--device cpu]

Runs alternate (on, off, on, off, ...) so that drift of a shared machine hits both alike; prints
the median seconds per simulated step of each, their ratio, the peak memory of each (CUDA:
max_memory_allocated; CPU: live tensor storages, the offloaded state counted as host memory) and
whether the two trajectories are bit-identical. Not run by gpu_check.sh (its 8 minutes are spent):
on a GPU, run it with --model sd14.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from outer_step import SD14_UNET, SD_SMALL_UNET  # noqa: E402

MODELS = {"sd-small": SD_SMALL_UNET, "sd14": SD14_UNET}


def build(model: str, device: str, seed: int = 0):
    """(unet, params, loss_fn): a random SD-shaped UNet and its denoising loss on fixed batches."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    cfg = MODELS[model]
    unet = UNet2DConditionModel(**cfg).to(device)
    unet.enable_gradient_checkpointing()
    s, d = cfg["sample_size"], cfg["cross_attention_dim"]
    g = torch.Generator().manual_seed(seed)
    x, noise = (torch.randn(1, 4, s, s, generator=g).to(device) for _ in range(2))
    emb = torch.randn(1, 77, d, generator=g).to(device)
    t = torch.tensor([500], device=device)

    def loss():
        return (
            (unet(x + noise, t, encoder_hidden_states=emb, return_dict=False)[0] - noise)
            .square()
            .mean()
        )

    return unet, [p for p in unet.parameters()], loss


def one_run(params, start, loss, steps: int, offload: bool, track: bool = False, lr: float = 1e-4):
    """(seconds per step, peak bytes, final params) of one Adam simulation from `start`. On CPU the
    peak comes from the storage tracker, whose dispatch overhead would distort the time: `track`
    picks one of the two (the time of a tracked run and the peak of an untracked one are 0)."""
    from resalign_fast.inner.inplace import simulate_inplace
    from resalign_fast.inner.optim import OptimSpec
    from resalign_fast.memplan.tracker import StorageTracker
    from resalign_fast.memplan.trainer import host_allocations

    with torch.no_grad():
        for p, w in zip(params, start):
            p.copy_(w)
    for p in params:
        p.requires_grad_(True)
    spec = OptimSpec("adam", lr=lr)
    cuda = params[0].is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        simulate_inplace(params, loss, spec, steps, offload=offload)
        torch.cuda.synchronize()
        dt, peak = time.perf_counter() - t0, torch.cuda.max_memory_allocated()
    elif not track:
        t0 = time.perf_counter()
        simulate_inplace(params, loss, spec, steps, offload=offload)
        dt, peak = time.perf_counter() - t0, 0
    else:
        tracker = StorageTracker(block=1)
        with tracker, host_allocations(tracker.host):
            tracker.register(params)
            t0 = time.perf_counter()
            simulate_inplace(params, loss, spec, steps, offload=offload)
            dt = 0.0
        peak = tracker.report().peak
    return dt / steps, peak, [p.detach().clone() for p in params]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="sd-small", choices=sorted(MODELS))
    ap.add_argument("--steps", type=int, default=3, help="simulated Adam steps per run")
    ap.add_argument(
        "--reps", type=int, default=5, help="runs of each (alternating), after one warm-up each"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    unet, params, loss = build(a.model, a.device)
    start = [p.detach().clone() for p in params]
    n = sum(p.numel() for p in params)
    times: dict[bool, list[float]] = {False: [], True: []}
    peaks, finals = {}, {}
    for rep in range(a.reps + 1):
        for off in (True, False):
            track = rep == 0 and a.device == "cpu"  # the warm-up round measures the CPU peak
            sec, peak, final = one_run(params, start, loss, a.steps, off, track)
            if rep:
                times[off].append(sec)
            if rep == 0:
                peaks[off], finals[off] = peak, final
            else:
                assert all(torch.equal(x, y) for x, y in zip(final, finals[off])), (
                    "a run is not reproducible"
                )
    same = all(torch.equal(x, y) for x, y in zip(finals[True], finals[False]))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"offload_optimizer_state: {a.model} UNet ({n / 1e6:.1f}M parameters) on {a.device}, Adam, "
        f"{a.steps} steps per run, {a.reps} runs each (alternating), medians"
    )
    print("| optimizer state | s / simulated step (min-max) | peak MiB |\n|---|---|---|")
    for off in (False, True):
        print(
            f"| {'host (offloaded)' if off else 'device'} | {med[off]:.3f} ({min(times[off]):.3f}-"
            f"{max(times[off]):.3f}) | {peaks[off] / 2**20:.1f} |"
        )
    print(
        f"time ratio offloaded / on device: {med[True] / med[False]:.3f}; peak ratio "
        f"{peaks[True] / peaks[False]:.3f}; trajectories bit-identical: {same}"
    )
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
