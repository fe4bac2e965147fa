"""The model side of evaluation: prompts to conditions, images to model space, DDIM sampling.

Works with any diffusers StableDiffusionPipeline-like object (`unet`, `scheduler`, `tokenizer`,
`text_encoder`, optional `vae`); without a VAE the model works on pixels in [-1, 1].
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from dcfast.engine.targets import prediction_type
from dcfast.models.prompts import encode_prompts


def resolution(pipe) -> int:
    """Image side length the model works at: U-Net sample size times the VAE's downsampling (1 without VAE)."""
    scale = pipe.vae_scale_factor if getattr(pipe, "vae", None) is not None else 1
    return pipe.unet.config.sample_size * scale


@torch.no_grad()
def pipeline_conditions(pipe, prompts: Sequence[str]) -> torch.Tensor:
    """Text-encoder hidden states (K, L, D) of the prompts in the U-Net's dtype, modifier tokens included (a
    multi-vector textual-inversion token expanded as the pipeline does)."""
    if hasattr(pipe, "maybe_convert_prompt"):
        prompts = [pipe.maybe_convert_prompt(p, pipe.tokenizer) for p in prompts]
    return encode_prompts(pipe.text_encoder, pipe.tokenizer, prompts, dtype=pipe.unet.dtype)


@torch.no_grad()
def to_model_space(pipe, images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> x0: the VAE latent mean times its scaling factor, or pixels in [-1, 1]."""
    pixels = (images * 2 - 1).to(pipe.unet.device, pipe.unet.dtype)
    if getattr(pipe, "vae", None) is None:
        return pixels
    vae = pipe.vae
    return vae.encode(pixels.to(vae.dtype)).latent_dist.mean.to(pipe.unet.dtype) * vae.config.scaling_factor


@torch.no_grad()
def generate(pipe, prompt: str, num_images: int, *, num_inference_steps: int = 20, guidance_scale: float = 7.5,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """DDIM sampling (eta = 0) with classifier-free guidance; images (n, 3, H, W) in [0, 1].

    The initial noise comes from `generator` on the CPU, so a seed gives the same images on any device.
    """
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(num_inference_steps)
    unet = pipe.unet
    size = unet.config.sample_size
    cond = pipeline_conditions(pipe, [prompt, ""])
    guided = guidance_scale != 1.0
    text = torch.cat([cond[1:].expand(num_images, -1, -1), cond[:1].expand(num_images, -1, -1)]) if guided \
        else cond[:1].expand(num_images, -1, -1)
    latents = torch.randn((num_images, unet.config.in_channels, size, size), generator=generator)
    latents = latents.to(unet.device, unet.dtype) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
        pred = unet(inp, t, encoder_hidden_states=text, return_dict=False)[0]
        if guided:
            uncond, cond_pred = pred.chunk(2)
            pred = uncond + guidance_scale * (cond_pred - uncond)
        latents = scheduler.step(pred, t, latents, eta=0.0, return_dict=False)[0]
    if getattr(pipe, "vae", None) is None:
        return ((latents.float() + 1) / 2).clamp(0, 1).cpu()
    vae = pipe.vae
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return ((images.float() + 1) / 2).clamp(0, 1).cpu()


def pipeline_prediction_type(pipe, where: str) -> str:
    """The pipeline's prediction type (epsilon or v_prediction, as DC scores support); ValueError naming `where`."""
    try:
        return prediction_type(pipe.scheduler)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
