"""The model side of evaluation: prompts to conditions, images to model space, DDIM sampling.

Works with any diffusers StableDiffusionPipeline-like object (`unet`, `scheduler`, `tokenizer`,
`text_encoder`, optional `vae`), and StableDiffusionXLPipeline-like ones (also `tokenizer_2`, `text_encoder_2`):
SDXL samples as its pipeline does (both encoders, the pooled embedding, the size-and-crop time ids of an
uncropped image at the model's resolution, zero conditions for the empty negative prompt). Without a VAE the
model works on pixels in [-1, 1].
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from dcfast.engine.targets import prediction_type
from dcfast.models.prompts import Conditions, encode_conditions, sdxl_time_ids


def resolution(pipe) -> int:
    """Image side length the model works at: U-Net sample size times the VAE's downsampling (1 without VAE)."""
    scale = pipe.vae_scale_factor if getattr(pipe, "vae", None) is not None else 1
    return pipe.unet.config.sample_size * scale


@torch.no_grad()
def pipeline_conditions(pipe, prompts: Sequence[str]) -> Conditions:
    """The prompts' conditions in the U-Net's dtype (hidden states (K, L, D); SDXL: and pooled (K, P)), modifier
    tokens included (a multi-vector textual-inversion token expanded as the pipeline does)."""
    if hasattr(pipe, "maybe_convert_prompt"):
        prompts = [pipe.maybe_convert_prompt(p, pipe.tokenizer) for p in prompts]
    return encode_conditions(pipe.text_encoder, pipe.tokenizer, prompts, pipe.unet.dtype,
                             getattr(pipe, "text_encoder_2", None), getattr(pipe, "tokenizer_2", None))


def default_time_ids(pipe) -> Optional[torch.Tensor]:
    """SDXL's time ids of an uncropped image at the model's resolution (what its pipeline uses by default), on the
    U-Net's device and dtype; None for SD 1.x/2.x."""
    if getattr(pipe, "text_encoder_2", None) is None:
        return None
    size = (resolution(pipe), resolution(pipe))
    return sdxl_time_ids(size, (0, 0), size).to(pipe.unet.device, pipe.unet.dtype)


def _negative(pipe, conds: Conditions) -> Conditions:
    """The empty prompt's conditions as the pipeline uses them: zeros for SDXL with force_zeros_for_empty_prompt."""
    config = getattr(pipe, "config", {})
    if conds.pooled is not None and (config.get("force_zeros_for_empty_prompt", True) if hasattr(config, "get") else True):
        return Conditions(torch.zeros_like(conds.hidden), torch.zeros_like(conds.pooled))
    return conds


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
    conds = pipeline_conditions(pipe, [prompt, ""])
    guided = guidance_scale != 1.0
    positive, negative = conds[0], _negative(pipe, conds[1])
    rows = 2 * num_images if guided else num_images
    text = Conditions(torch.stack([negative.hidden, positive.hidden]).repeat_interleave(num_images, 0),
                      None if positive.pooled is None else
                      torch.stack([negative.pooled, positive.pooled]).repeat_interleave(num_images, 0)) if guided \
        else positive
    unet_kwargs = text.unet_kwargs(rows, default_time_ids(pipe))
    latents = torch.randn((num_images, unet.config.in_channels, size, size), generator=generator)
    latents = latents.to(unet.device, unet.dtype) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
        pred = unet(inp, t, return_dict=False, **unet_kwargs)[0]
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
