"""Tiny model configs shared by tests (imported as `tiny`: `conftest` names clash across folders)."""


def tiny_unet_config(**kw) -> dict:
    """A diffusers UNet2DConditionModel config small enough for second-order tests."""
    cfg = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
               cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4)
    cfg.update(kw)
    return cfg
