"""One real ResAlign outer step (`bilevel.ResAlign.step`) per memory recipe, on SD-shaped UNets.

Shared by `bench_outer_step.py` (CPU, pytest-benchmark) and `gpu_outer_step.py` (the GPU table of
gpu_check.sh). The model is built in memory with random weights: an SD-shaped UNet (any scale), a
one-layer CLIP text encoder of the right width, and encoded data sets of random latents and text
embeddings, so the step runs exactly the code users run, with no weights or data.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

SD14_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
# SD's block structure scaled down for CPU benchmarks (same levels, attention placement and heads).
SD_SMALL_UNET = dict(
    SD14_UNET,
    sample_size=16,
    block_out_channels=(32, 64, 128, 128),
    cross_attention_dim=64,
    norm_num_groups=16,
)

# Reference recipe of the paper: fp32, math attention, double-backward HVPs, no checkpointing.
RECIPES = {
    "reference": dict(attention="math", hvp="exact", gradient_checkpointing=False),
    "lean-exact": dict(attention="auto", hvp="exact", gradient_checkpointing=False),
    "lean-exact-ckpt": dict(attention="auto", hvp="exact", gradient_checkpointing=True),
    "lean-jvp": dict(attention="auto", hvp="jvp", gradient_checkpointing=False),
    "lean-fd": dict(attention="auto", hvp="fd", gradient_checkpointing=False),
    "lean-fd-ckpt": dict(attention="auto", hvp="fd", gradient_checkpointing=True),
}


# The default workload (`train` as users run it): k = 3 configurations per outer step drawn from the
# default pi(C), the guard's retries included. "reference" is the paper's recipe and guard; "ours"
# the defaults of this project with fd HVPs; "ours-exact" is ours with exact HVPs and math
# attention,
# the same solve computed without approximation (the quality check of the fd path).
WORKLOAD = {
    "reference": dict(
        attention="math", hvp="exact", gradient_checkpointing=False, guard="reference"
    ),
    "ours": dict(attention="auto", hvp="fd", gradient_checkpointing=False, guard="stable"),
    "ours-exact": dict(attention="math", hvp="exact", gradient_checkpointing=False, guard="stable"),
}
PHASES = (
    "simulate_finetune",
    "simulate_inplace",
    "guarded_hypergrad",
    "stable_hypergrad",
    "esd_target",
)


def build_model(unet_config: dict, seed: int = 0, text_len: int = 77):
    """A DiffusionModel with random weights (no VAE: the UNet works on random 'latents')."""
    from resalign_fast.models.pipeline import build_digits_model

    d = unet_config["cross_attention_dim"]
    return build_digits_model(
        seed,
        unet_config,
        dict(
            hidden_size=d,
            intermediate_size=d,
            num_hidden_layers=1,
            num_attention_heads=max(1, d // 64),
            projection_dim=d,
            max_position_embeddings=text_len,
        ),
    )


def build_data(model, n: int = 4, seed: int = 0, device="cpu") -> dict:
    """Encoded D_harmful, D_preserve, D_FT of random latents with random prompts' embeddings."""
    from resalign_fast.data.encoded import EncodedSet

    g = torch.Generator().manual_seed(seed)
    c, s = model.unet.config.in_channels, model.unet.config.sample_size
    emb = model.encode_prompts([f"prompt {i}" for i in range(n)]).to(device)
    return {
        k: EncodedSet(torch.randn(n, c, s, s, generator=g).to(device), emb, [""] * n)
        for k in ("harmful", "preserve", "ft")
    }


def ft_space_file(
    path: Path,
    algorithm: str = "lora",
    loss: str = "standard",
    optimizer: str = "adam",
    steps: int = 2,
) -> Path:
    """A one-configuration pi(C), so every recipe runs the same configuration."""
    path.write_text(
        f'[[configs]]\nlr = 1e-4\nsteps = {steps}\nloss = "{loss}"\nalgorithm = "{algorithm}"\n'
        f'optimizer = "{optimizer}"\nbatch_size = 1\n'
    )
    return path


def prepare(
    recipe: str, unet_config: dict, ft_space: Path, device="cpu", iters: int = 5, seed: int = 0
):
    """A ResAlign ready for outer step 0 with `recipe`. Only the UNet moves to `device`: the text
    embeddings are precomputed, as in a real run, so the text encoder is not resident."""
    from resalign_fast.bilevel import ResAlign
    from resalign_fast.config import ResAlignConfig
    from resalign_fast.inner.configs import load_ft_space

    cfg = ResAlignConfig(
        ft_space=str(ft_space),
        batch_size=1,
        configs_per_step=1,
        iters=iters,
        seed=seed,
        max_grad_norm=1e9,
        **RECIPES[recipe],
    )
    model = build_model(unet_config, seed)
    data = build_data(model, device=device)
    uncond = model.encode_prompts([""]).to(device)
    model.unet.to(device)
    return ResAlign(cfg, model, data, load_ft_space(cfg.ft_space), uncond_emb=uncond)


def run_step(algo):
    """Outer step 0; returns (StepResult, seconds, the hypergradient handed to AdamW, flattened)."""
    seen = {}
    step = algo.opt.step

    def record(*a, **k):
        seen["g"] = torch.cat([p.grad.detach().flatten() for p in algo.theta])
        return step(*a, **k)

    algo.opt.step = record
    t0 = time.perf_counter()
    res = algo.step(0)
    if algo.theta[0].is_cuda:
        torch.cuda.synchronize()
    return res, time.perf_counter() - t0, seen.get("g")


def recipe_table(rows: list[dict]) -> str:
    """Markdown table of recipe rows (recipe, peak, seconds, ratios, cosine)."""
    head = (
        "| recipe | peak MiB | peak / reference | seconds | time / reference "
        "| hypergradient cosine vs reference |\n|---|---|---|---|---|---|\n"
    )
    return head + "".join(
        f"| {r['recipe']} | {r['peak'] / 2**20:.1f} | {r['peak_ratio']:.3f} | {r['seconds']:.2f} | "
        f"{r['time_ratio']:.2f} | {r['cosine']:.6f} |\n"
        for r in rows
    )


def compare(
    unet_config: dict, ft_space: Path, device="cpu", recipes=tuple(RECIPES), measure_peak=None
) -> list[dict]:
    """Run every recipe (the first is the baseline); peak from `measure_peak(algo, fn) -> (fn(),
    bytes)`."""
    rows, ref = [], None
    for name in recipes:
        algo = prepare(name, unet_config, ft_space, device)
        (res, dt, g), peak = measure_peak(algo, lambda a=algo: run_step(a))
        if ref is None:
            ref = dict(peak=peak, seconds=dt, g=g)
        cos = torch.nn.functional.cosine_similarity(g.double(), ref["g"].double(), dim=0).item()
        rows.append(
            dict(
                recipe=name,
                peak=peak,
                seconds=dt,
                peak_ratio=peak / ref["peak"],
                time_ratio=dt / ref["seconds"],
                cosine=cos,
                fallbacks=res.fallbacks,
                retries=res.retries,
            )
        )
        del algo
    return rows


def cpu_peak(algo, fn):
    """(fn(), peak live tensor bytes) by the storage tracker on real CPU tensors, UNet and data
    included."""
    from resalign_fast.memplan.tracker import StorageTracker

    with StorageTracker(block=1) as tr:
        tr.register(list(algo.space.unet.parameters()) + list(algo.space.unet.buffers()))
        tr.register([t for d in algo.data.values() for t in (d.x0, d.emb)])
        out = fn()
    return out, tr.report().peak


def cuda_peak(algo, fn):
    """(fn(), torch.cuda.max_memory_allocated) with the UNet and data resident."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated()


class PhaseTimer:
    """Seconds spent in each of `bilevel`'s phase functions (PHASES) while active."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __enter__(self):
        import resalign_fast.bilevel as bl

        self._saved = {n: getattr(bl, n) for n in PHASES}
        for n, f in self._saved.items():
            setattr(bl, n, self._timed(n, f))
        return self

    def _timed(self, name, f):
        def run(*a, **k):
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

        return run

    def __exit__(self, *exc):
        import resalign_fast.bilevel as bl

        for n, f in self._saved.items():
            setattr(bl, n, f)


def workload(
    unet_config: dict, steps: int = 2, device="cpu", recipes=tuple(WORKLOAD), k: int = 3
) -> list[dict]:
    """`steps` outer steps of the default workload per recipe, the recipes interleaved step by step
    (so that drift of a shared machine hits all alike). Every recipe starts from the same theta and
    seed, so it draws the same configurations. Returns one row per recipe: median seconds per outer
    step, HVPs, retries and fallbacks per step, seconds per phase (summed over steps), and the
    cosine of step 0's hypergradient with "ours-exact"'s (when that recipe runs)."""
    from resalign_fast.bilevel import ResAlign
    from resalign_fast.config import ResAlignConfig
    from resalign_fast.inner.configs import load_ft_space

    algos, rows = {}, {}
    for name in recipes:
        cfg = ResAlignConfig(batch_size=1, configs_per_step=k, seed=0, **WORKLOAD[name])
        model = build_model(unet_config, 0)
        data = build_data(model, device=device)
        uncond = model.encode_prompts([""]).to(device)
        model.unet.to(device)
        algos[name] = ResAlign(cfg, model, data, load_ft_space(cfg.ft_space), uncond_emb=uncond)
        rows[name] = dict(
            recipe=name, seconds=[], hvps=0, retries=0, fallbacks=0, phases={}, g0=None, configs=[]
        )
    for s in range(steps):
        for name, algo in algos.items():
            with PhaseTimer() as pt:
                res, dt, g = run_step(algo) if s == 0 else (*_step(algo, s), None)
            r = rows[name]
            r["seconds"].append(dt)
            r["hvps"] += res.hvps
            r["retries"] += res.retries
            r["fallbacks"] += res.fallbacks
            r["configs"].append(res.configs)
            for ph, v in pt.seconds.items():
                r["phases"][ph] = r["phases"].get(ph, 0.0) + v
            if g is not None:
                r["g0"] = g
    exact = rows.get("ours-exact", {}).get("g0")
    base = rows[recipes[0]]
    out = []
    for name in recipes:
        r = rows[name]
        sec = sorted(r["seconds"])[len(r["seconds"]) // 2]
        cos = (
            torch.nn.functional.cosine_similarity(r["g0"].double(), exact.double(), dim=0).item()
            if exact is not None
            else float("nan")
        )
        out.append(
            dict(
                recipe=name,
                seconds_per_step=sec,
                all_seconds=r["seconds"],
                hvps_per_step=r["hvps"] / steps,
                retries_per_step=r["retries"] / steps,
                fallbacks_per_step=r["fallbacks"] / steps,
                phases={k: v / steps for k, v in r["phases"].items()},
                cosine_vs_exact=cos,
                same_configs=r["configs"] == base["configs"],
            )
        )
    ref = out[0]["seconds_per_step"]
    for r in out:
        r["speedup_vs_reference"] = ref / r["seconds_per_step"]
    return out


def _step(algo, s: int):
    t0 = time.perf_counter()
    res = algo.step(s)
    if algo.theta[0].is_cuda:
        torch.cuda.synchronize()
    return res, time.perf_counter() - t0


def workload_table(rows: list[dict]) -> str:
    """Markdown table of `workload` rows."""
    head = (
        "| recipe | s / outer step | speedup vs reference | HVPs / step | retries / step | "
        "fallbacks / step | "
        "simulation s | hypergradient s | cosine vs exact-HVP solve "
        "|\n|---|---|---|---|---|---|---|---|---|\n"
    )
    body = ""
    for r in rows:
        sim = sum(v for k, v in r["phases"].items() if k.startswith("simulate"))
        hyp = sum(v for k, v in r["phases"].items() if k.endswith("hypergrad"))
        body += (
            f"| {r['recipe']} | {r['seconds_per_step']:.2f} | {r['speedup_vs_reference']:.2f}x | "
            f"{r['hvps_per_step']:.1f} | {r['retries_per_step']:.1f} | "
            f"{r['fallbacks_per_step']:.1f} | {sim:.2f} | "
            f"{hyp:.2f} | {r['cosine_vs_exact']:.6f} |\n"
        )
    return head + body
