"""GPU table: one real ResAlign outer step per memory recipe on an SD v1.4-shaped UNet.

    python benchmarks/gpu_outer_step.py [--resolution 64] [--algorithms lora full]

Random-initialised SD v1.4 UNet (860M parameters), 64x64 latents (512 px), batch 1, rank-4 LoRA on
every attention layer, one sampled configuration (Adam, 2 simulated steps) and K = 5 Richardson
iterations. Prints peak torch.cuda.max_memory_allocated, seconds, and ratios and hypergradient
cosine against the reference recipe (fp32, math attention, double backward, no checkpointing),
measured in the same run. Part of benchmarks/gpu_check.sh.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from outer_step import RECIPES, SD14_UNET, compare, cuda_peak, ft_space_file, recipe_table  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=64, help="latent size (64 = 512 px)")
    p.add_argument("--algorithms", nargs="+", default=["lora", "full"])
    p.add_argument("--recipes", nargs="+", default=list(RECIPES))
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_outer_step.py needs a CUDA device")
    cfg = dict(SD14_UNET, sample_size=a.resolution)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as d:
        for algo in a.algorithms:
            rows = compare(cfg, ft_space_file(Path(d) / f"{algo}.toml", algorithm=algo), device="cuda",
                           recipes=a.recipes, measure_peak=cuda_peak)
            print(f"\nSD v1.4-shaped UNet, {a.resolution}x{a.resolution} latents, batch 1, {algo} fine-tuning config:\n"
                  + recipe_table(rows), flush=True)


if __name__ == "__main__":
    main()
