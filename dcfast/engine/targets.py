"""What a DC pass predicts and reads: the diffusion targets (eps or v, by the scheduler's `prediction_type`),
Diffusion Classifier's default timesteps, and the validated inputs of a pass (`prepare_inputs` -> `DCInputs`).

For images x0, noise eps and timesteps t, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps and the model
predicts eps ("epsilon") or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 ("v_prediction"); "sample" models
are refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class DCInputs:
    """Validated engine inputs: images, and the noise, timestep and abar of every (image, j) pair."""

    x0: torch.Tensor  # (B, C, H, W)
    noise: torch.Tensor  # (B, T, C, H, W), possibly an expanded view
    timesteps: torch.Tensor  # (B, T) long
    abar: torch.Tensor  # (B, T) alphas_cumprod[timesteps] in x0's dtype
    prediction: str = "epsilon"  # the scheduler's prediction_type, one of PREDICTION_TYPES
    # SDXL's added conditions (a U-Net with addition_embed_type "text_time"), else None: each concept's pooled
    # text embedding (K, P) and each image's size-and-crop ids (B, n).
    text_embeds: Optional[torch.Tensor] = None
    time_ids: Optional[torch.Tensor] = None

    def added_cond_kwargs(self, images: slice, concepts: slice) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(text_embeds of `concepts`, time_ids of `images`), or None for a U-Net without added conditions."""
        if self.text_embeds is None:
            return None
        return self.text_embeds[concepts], self.time_ids[images]

    def x_t(self, b: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Noised inputs of rows (b, j): sqrt(abar) x0[b] + sqrt(1 - abar) eps[b, j]."""
        abar = self.abar[b, j].view(-1, 1, 1, 1)
        return abar.sqrt() * self.x0[b] + (1 - abar).sqrt() * self.noise[b, j]

    @property
    def shape(self) -> Tuple[int, int]:
        return self.noise.shape[0], self.noise.shape[1]


def default_timesteps(num_train_timesteps: int, num_timesteps: int) -> torch.Tensor:
    """Diffusion Classifier's evenly strided timesteps: range(N//T//2, N, N//T), T of them."""
    if not 0 < num_timesteps <= num_train_timesteps:
        raise ValueError(f"num_timesteps must be in [1, {num_train_timesteps}], got {num_timesteps}")
    stride = num_train_timesteps // num_timesteps
    return torch.arange(stride // 2, num_train_timesteps, stride)[:num_timesteps]


def prediction_type(scheduler) -> str:
    """The scheduler's `prediction_type` ("epsilon" when its config has none); ValueError for others."""
    config = getattr(scheduler, "config", None)
    kind = (config.get("prediction_type", None) if hasattr(config, "get") else None) or "epsilon"
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"scheduler prediction_type {kind!r} is not supported; DC scores and the training losses "
                         f"support {' and '.join(PREDICTION_TYPES)} models (use an epsilon or v-prediction model)")
    return kind


def training_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the model learns to predict at (x0, eps, t): eps, or v = scheduler.get_velocity(x0, eps, t)."""
    if prediction_type(scheduler) == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    return noise


def alphas_cumprod(scheduler) -> torch.Tensor:
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if not isinstance(alphas, torch.Tensor):
        raise TypeError(
            f"scheduler must have an `alphas_cumprod` tensor (a diffusers DDPM/DDIM-style scheduler); "
            f"{type(scheduler).__name__} has none"
        )
    return alphas


def prepare_inputs(unet, scheduler, x0: torch.Tensor, cond: torch.Tensor, *, timesteps=None, noise=None,
                   num_timesteps: int = 8, generator: Optional[torch.Generator] = None,
                   added_cond_kwargs: Optional[dict] = None) -> DCInputs:
    """Check shapes, dtypes and devices; draw missing timesteps/noise. Shared by every engine."""
    if not isinstance(x0, torch.Tensor) or x0.dim() != 4:
        raise ValueError(f"x0 must be a (B, C, H, W) tensor, got {getattr(x0, 'shape', type(x0))}")
    if not isinstance(cond, torch.Tensor) or cond.dim() != 3:
        raise ValueError(f"cond must be a (K, L, D) tensor of encoder hidden states, got {getattr(cond, 'shape', type(cond))}")
    B, C, H, W = x0.shape
    K, _, D = cond.shape
    if K == 0 or B == 0:
        raise ValueError(f"need at least one image and one concept, got B={B} images and K={K} concepts")
    config = unet.config
    if C != config.in_channels:
        raise ValueError(f"x0 has {C} channels but the U-Net expects in_channels={config.in_channels}")
    if D != config.cross_attention_dim:
        raise ValueError(f"cond's last dim is {D} but the U-Net's cross_attention_dim is {config.cross_attention_dim}")
    if cond.device != x0.device or cond.dtype != x0.dtype:
        raise ValueError(f"cond ({cond.dtype}, {cond.device}) must match x0 ({x0.dtype}, {x0.device})")
    alphas = alphas_cumprod(scheduler)
    num_train = alphas.shape[0]

    if timesteps is None:
        timesteps = default_timesteps(num_train, num_timesteps)
    timesteps = torch.as_tensor(timesteps)
    if timesteps.is_floating_point() or timesteps.dim() not in (1, 2):
        raise ValueError(f"timesteps must be an integer (T,) or (B, T) tensor, got {timesteps.dtype} {tuple(timesteps.shape)}")
    if timesteps.dim() == 2 and timesteps.shape[0] != B:
        raise ValueError(f"per-image timesteps must be (B, T) with B={B}, got {tuple(timesteps.shape)}")
    if timesteps.numel() and (timesteps.min() < 0 or timesteps.max() >= num_train):
        raise ValueError(f"timesteps must lie in [0, {num_train}), got [{timesteps.min()}, {timesteps.max()}]")
    timesteps = timesteps.to(x0.device, torch.long).expand(B, -1) if timesteps.dim() == 1 else timesteps.to(x0.device, torch.long)
    T = timesteps.shape[1]
    if T == 0:
        raise ValueError("need at least one timestep (T >= 1)")

    if noise is None:
        noise = torch.randn((B, T, C, H, W), generator=generator, device=x0.device, dtype=x0.dtype)
    elif not isinstance(noise, torch.Tensor) or noise.shape not in ((B, T, C, H, W), (T, C, H, W)):
        raise ValueError(f"noise must be (B, T, C, H, W) = {(B, T, C, H, W)} or shared (T, C, H, W), "
                         f"got {tuple(getattr(noise, 'shape', ()))}")
    elif noise.dtype != x0.dtype or noise.device != x0.device:
        raise ValueError(f"noise ({noise.dtype}, {noise.device}) must match x0 ({x0.dtype}, {x0.device})")
    noise = noise.expand(B, T, C, H, W)

    abar = alphas.to(x0.device)[timesteps].to(x0.dtype)
    text_embeds, time_ids = added_conditions(unet, added_cond_kwargs, B, K, x0)
    return DCInputs(x0=x0, noise=noise, timesteps=timesteps, abar=abar, prediction=prediction_type(scheduler),
                    text_embeds=text_embeds, time_ids=time_ids)


def uses_added_conditions(unet) -> bool:
    """Whether the U-Net (peft-wrapped or not) reads SDXL's text_embeds and time_ids (addition_embed_type "text_time")."""
    config = getattr(unet, "config", None)
    return getattr(config, "addition_embed_type", None) == "text_time"


def added_conditions(unet, added_cond_kwargs: Optional[dict], B: int, K: int,
                     x0: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Checked (text_embeds (K, P), time_ids (B, n)) of an SDXL U-Net, (None, None) for one without added conditions.

    time_ids may be given once, (n,), for every image (the same size and crop) and is expanded to (B, n).
    """
    if not uses_added_conditions(unet):
        if added_cond_kwargs:
            raise ValueError("added_cond_kwargs given, but the U-Net has no added conditions (its config's "
                             "addition_embed_type is not 'text_time', i.e. not SDXL): drop added_cond_kwargs")
        return None, None
    if not added_cond_kwargs or set(added_cond_kwargs) != {"text_embeds", "time_ids"}:
        raise ValueError(f"an SDXL U-Net (addition_embed_type 'text_time') needs added_cond_kwargs with exactly "
                         f"'text_embeds' (K, P), each concept's pooled text embedding, and 'time_ids' (B, 6) or (6,), "
                         f"each image's size and crop; got {sorted(added_cond_kwargs or {})}")
    text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
    config = unet.config
    if not isinstance(text_embeds, torch.Tensor) or text_embeds.dim() != 2 or text_embeds.shape[0] != K:
        raise ValueError(f"added_cond_kwargs['text_embeds'] must be (K, P) with K={K} (one pooled embedding per "
                         f"concept of cond), got {tuple(getattr(text_embeds, 'shape', ()))}")
    time_ids = torch.as_tensor(time_ids, device=x0.device)
    if time_ids.dim() == 1:
        time_ids = time_ids.expand(B, -1)
    if time_ids.dim() != 2 or time_ids.shape[0] != B:
        raise ValueError(f"added_cond_kwargs['time_ids'] must be (B, n) with B={B} (one row per image) or (n,) "
                         f"shared, got {tuple(time_ids.shape)}")
    width = text_embeds.shape[1] + time_ids.shape[1] * config.addition_time_embed_dim
    if width != config.projection_class_embeddings_input_dim:
        raise ValueError(f"text_embeds ({text_embeds.shape[1]}) and time_ids ({time_ids.shape[1]} x "
                         f"addition_time_embed_dim {config.addition_time_embed_dim}) make {width} inputs, but the "
                         f"U-Net's projection_class_embeddings_input_dim is "
                         f"{config.projection_class_embeddings_input_dim}: pass the pooled embedding of its second "
                         f"text encoder and SDXL's 6 time ids")
    if text_embeds.device != x0.device:
        raise ValueError(f"added_cond_kwargs['text_embeds'] is on {text_embeds.device}, x0 on {x0.device}")
    return text_embeds.to(x0.dtype), time_ids.to(x0.dtype)
