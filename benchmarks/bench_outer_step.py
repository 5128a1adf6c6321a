"""One real ResAlign outer step per memory recipe, CPU (`pytest benchmarks/ --benchmark-only`).

Peak = live tensor bytes (storage tracker, UNet + data included); each recipe's peak, time and
hypergradient are compared with the reference recipe's, measured in the same run. CPU timings are
smoke tests; the GPU table comes from gpu_check.sh.
"""

import pytest

from outer_step import RECIPES, SD_SMALL_UNET, compare, cpu_peak, ft_space_file, recipe_table


@pytest.mark.parametrize("algorithm", ["lora", "full"])
def test_outer_step_recipes_sd_small(benchmark, tmp_path, algorithm):
    space = ft_space_file(tmp_path / "c.toml", algorithm=algorithm)
    rows = benchmark.pedantic(lambda: compare(SD_SMALL_UNET, space, measure_peak=cpu_peak), rounds=1, iterations=1)
    print(f"\nSD-shaped UNet (blocks {SD_SMALL_UNET['block_out_channels']}, 16x16 latents), {algorithm} config:\n"
          + recipe_table(rows))
    benchmark.extra_info.update({r["recipe"]: {k: r[k] for k in ("peak", "peak_ratio", "seconds", "time_ratio", "cosine")}
                                 for r in rows})
    assert [r["recipe"] for r in rows] == list(RECIPES)
    for r in rows:
        assert r["cosine"] >= 0.999, r
