"""Image generation with classifier-free guidance (DDIM), for pixel-space and latent models
alike."""

from __future__ import annotations

import torch

from resalign_fast.models.pipeline import DiffusionModel


@torch.no_grad()
def generate(
    model: DiffusionModel,
    prompts: list[str],
    *,
    steps: int = 25,
    guidance: float = 3.0,
    seed: int = 0,
    batch_size: int = 64,
    unet: torch.nn.Module | None = None,
) -> torch.Tensor:
    """Generate one image per prompt.

    Args:
        model: the model (its scheduler config defines the noise schedule).
        prompts: N prompts; repeat a prompt for several images.
        steps: DDIM sampling steps.
        guidance: classifier-free guidance scale (1 disables the unconditional pass).
        seed: generation seed; image i's noise depends only on (seed, i), so results do not depend
            on batch_size.
        unet: an alternative UNet (e.g. a fine-tuned one) sharing the model's other parts.

    Returns:
        (N, C, H, W) images in [-1, 1], on the CPU.
    """
    from diffusers import DDIMScheduler

    unet = unet or model.unet
    dev = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    sched = DDIMScheduler.from_config(model.scheduler.config)
    sched.set_timesteps(steps)
    c, s = int(unet.config.in_channels), int(unet.config.sample_size)
    out = []
    uncond = model.encode_prompts([""])
    for lo in range(0, len(prompts), batch_size):
        batch = prompts[lo : lo + batch_size]
        noise = torch.stack(
            [
                torch.randn(
                    c, s, s, generator=torch.Generator().manual_seed(seed * 1_000_003 + lo + i)
                )
                for i in range(len(batch))
            ]
        )
        x = (noise * sched.init_noise_sigma).to(dev, dtype)
        cond = model.encode_prompts(batch).to(dev, dtype)
        emb = (
            torch.cat([uncond.expand(len(batch), -1, -1).to(dev, dtype), cond])
            if guidance != 1
            else cond
        )
        for t in sched.timesteps:
            inp = torch.cat([x, x]) if guidance != 1 else x
            eps = unet(sched.scale_model_input(inp, t), t, emb).sample
            if guidance != 1:
                e_u, e_c = eps.chunk(2)
                eps = e_u + guidance * (e_c - e_u)
            x = sched.step(eps, t, x).prev_sample
        out.append(model.to_images(x.float()).cpu())
    return torch.cat(out)


def image_grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """Tile (N, C, H, W) images in [-1, 1] into one (C, H', W') uint8 grid with 1-pixel gaps."""
    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.zeros(c, rows * (h + 1) + 1, nrow * (w + 1) + 1)
    for i, im in enumerate(images):
        r, k = divmod(i, nrow)
        grid[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + k * (w + 1) : 1 + k * (w + 1) + w] = (
            im + 1
        ) / 2
    return (grid.clamp(0, 1) * 255).round().to(torch.uint8)


def save_png(grid: torch.Tensor, path, scale: int = 4) -> None:
    """Save a (C, H, W) uint8 grid as PNG, upscaled `scale` times (nearest) for viewing."""
    from PIL import Image

    arr = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2).permute(1, 2, 0).numpy()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(path)
