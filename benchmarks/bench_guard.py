"""The default digits run's outer steps under the reference guard and the stable guard, in one run
(`pytest benchmarks/bench_guard.py --benchmark-only -s`).

For each guard: seconds and HVPs per outer step, retries and fallbacks, over RESALIGN_BENCH_STEPS
outer steps (default 3) of the train defaults on the embedded digits model, the two guards
alternating step by step so that machine load hits both alike. Hypergradient quality: at outer step
0, every sampled configuration's hypergradient is compared (cosine) with a converged solve of the
same system (50 conjugate-gradient iterations; a configuration where CG meets non-positive curvature
is reported, not compared). CPU timings
are smoke tests on a shared machine; the ratio is the figure.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import torch

from resalign_fast.config import ResAlignConfig

STEPS = int(os.environ.get("RESALIGN_BENCH_STEPS", "3"))


def _algo(cfg: ResAlignConfig):
    from resalign_fast.bilevel import ResAlign
    from resalign_fast.inner.configs import load_ft_space
    from resalign_fast.models.pipeline import load_model
    from resalign_fast.runs import load_data

    torch.manual_seed(cfg.seed)
    model = load_model(cfg.pretrained_model_name_or_path)
    data = load_data(cfg, model, torch.device("cpu"))
    data.pop("_sample_prompts")
    uncond = model.encode_prompts([""]).float()
    torch.manual_seed(cfg.seed)
    return ResAlign(cfg, model, data, load_ft_space(cfg.ft_space), uncond_emb=uncond)


def _cos(a, b) -> float:
    num = sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))
    return num / math.sqrt(
        sum(float(x.double().square().sum()) for x in a)
        * sum(float(y.double().square().sum()) for y in b)
    )


def _step0_hypergrads(algo) -> list[list[torch.Tensor]]:
    """Each configuration's hypergradient of outer step 0 (as `ResAlign.step` computes it, no
    update)."""
    from resalign_fast.bilevel import config_generator, step_generator

    cfg = algo.cfg
    gen = step_generator(cfg.seed, 0)
    direct = algo.direct_grad(0, gen)
    configs = algo.ft_space.sample(cfg.configs_per_step, gen)
    out = []
    for i, c in enumerate(configs):
        r = algo.config_hypergrad(c, direct, config_generator(cfg.seed, 0, i), slot=i)
        out.append(
            None if r.fallback and cfg.solver == "cg" else [x.detach().clone() for x in r.grad]
        )
    return out


def compare_guards(steps: int = STEPS) -> dict:
    base = ResAlignConfig(samples_per_prompt=0, progress=False)
    cfgs = {
        "reference": dataclasses.replace(base, guard="reference"),
        "stable": base,
        "converged": dataclasses.replace(
            base, guard="reference", solver="cg", iters=50, max_grad_norm=1e9
        ),
    }
    algos = {k: _algo(c) for k, c in cfgs.items()}
    exact = _step0_hypergrads(algos["converged"])
    rows = {}
    for name in ("reference", "stable"):
        algos[name].warm_vectors.clear()
        got = _step0_hypergrads(algos[name])
        algos[name].warm_vectors.clear()  # the timed steps start cold, as a run does
        rows[name] = {
            "cosines": [None if b is None else round(_cos(a, b), 5) for a, b in zip(got, exact)],
            "seconds": [],
            "hvps": 0,
            "retries": 0,
            "fallbacks": 0,
            "configs": 0,
        }
    for s in range(steps):
        for name in ("reference", "stable"):
            t0 = time.perf_counter()
            res = algos[name].step(s)
            row = rows[name]
            row["seconds"].append(time.perf_counter() - t0)
            row["hvps"] += res.hvps
            row["retries"] += res.retries
            row["fallbacks"] += res.fallbacks
            row["configs"] += len(res.configs)
    for row in rows.values():
        row["s_per_step"] = sum(row["seconds"]) / steps
        row["hvps_per_step"] = row["hvps"] / steps
    rows["speedup"] = rows["reference"]["s_per_step"] / rows["stable"]["s_per_step"]
    return rows


def test_guard_speed_and_quality(benchmark):
    torch.set_num_threads(1)
    rows = benchmark.pedantic(compare_guards, rounds=1, iterations=1)
    print(f"\ndefault digits run, {STEPS} outer steps per guard (k = 3 configurations each):")
    for name in ("reference", "stable"):
        r = rows[name]
        print(
            f"  {name:9s}: {r['s_per_step']:.2f} s/step, {r['hvps_per_step']:.1f} HVPs/step, "
            f"retries {r['retries']}, "
            f"fallbacks {r['fallbacks']} of {r['configs']}; step-0 cosine vs converged solve "
            f"{r['cosines']}"
        )
    print(f"  stable / reference speed: {rows['speedup']:.2f}x")
    benchmark.extra_info.update(rows)
    assert rows["stable"]["fallbacks"] <= rows["reference"]["fallbacks"]
