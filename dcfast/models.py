"""Models: the tiny Stable-Diffusion-layout components built in code (tests, demo, benchmarks).

The U-Net mirrors SD 1.x's block layout (cross-attention at full resolution first) at toy width.
"""
from __future__ import annotations

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

TINY_CROSS_ATTENTION_DIM = 32


def tiny_unet(seed: int = 0, sample_size: int = 16, in_channels: int = 4,
              cross_attention_dim: int = TINY_CROSS_ATTENTION_DIM) -> UNet2DConditionModel:
    """A ~1.1M-parameter UNet2DConditionModel, block_out_channels=(32, 64), seeded and in eval mode."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    return unet.eval()


def tiny_scheduler() -> DDPMScheduler:
    """SD 1.x's training scheduler (scaled-linear betas, 1000 steps)."""
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, clip_sample=False)
