"""Real model architectures built in code from their published configs, with seeded random weights and nothing
downloaded: what `dcfast bench train --arch` and the FLOP counts (`dcfast.bench.flops`) measure at full size.

An `Architecture` is the published `unet/config.json`, the text encoders whose hidden states the U-Net's
cross-attention reads (class name and config each, in the order their states are joined) and the training
scheduler's config. Another architecture is one more entry of ARCHITECTURES. SDXL lists two text encoders
(CLIPTextModel and CLIPTextModelWithProjection, whose projected pooled output is the U-Net's `text_embeds`) and a
U-Net with `addition_embed_type="text_time"`; its added conditions are the DC engine's to drive, not this module's.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Tuple, Union

if TYPE_CHECKING:  # imported where used: the command line reads ARCHITECTURES without loading torch
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel


@dataclass(frozen=True)
class Architecture:
    """A model family's published configs: U-Net, text encoders (class name, config), training scheduler."""

    name: str
    unet_config: Mapping[str, object]  # UNet2DConditionModel(**unet_config)
    text_encoders: Tuple[Tuple[str, Mapping[str, object]], ...]  # (transformers class name, its config's kwargs)
    scheduler_config: Mapping[str, object]  # DDPMScheduler(**scheduler_config): the training noise schedule

    @property
    def latent_size(self) -> int:
        """The U-Net's native latent side (64 for SD 1.5's 512-pixel images)."""
        return int(self.unet_config["sample_size"])

    @property
    def cross_attention_dim(self) -> int:
        """Width of the conditions the U-Net's cross-attention reads."""
        return int(self.unet_config["cross_attention_dim"])

    @property
    def is_sdxl(self) -> bool:
        """Whether the U-Net reads SDXL's added conditions (pooled text embedding and time ids)."""
        return self.unet_config.get("addition_embed_type") == "text_time"


def _frozen(config: Dict[str, object]) -> Mapping[str, object]:
    return MappingProxyType(config)


# stable-diffusion-v1-5/stable-diffusion-v1-5: unet/config.json, text_encoder/config.json (CLIP ViT-L/14's text
# tower) and scheduler/scheduler_config.json's noise schedule, as published; keys checked against diffusers 0.42's
# UNet2DConditionModel signature (test_architectures.py).
SD15 = Architecture(
    name="sd15",
    unet_config=_frozen(dict(
        sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
        act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8)),
    text_encoders=(("CLIPTextModel", _frozen(dict(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        attention_dropout=0.0, dropout=0.0, initializer_range=0.02, initializer_factor=1.0,
        bos_token_id=0, eos_token_id=2, pad_token_id=1))),),
    scheduler_config=_frozen(dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", clip_sample=False, prediction_type="epsilon")),
)

# stabilityai/stable-diffusion-xl-base-1.0: unet/config.json (2.567B parameters), text_encoder/config.json (CLIP
# ViT-L/14's text tower) and text_encoder_2/config.json (OpenCLIP ViT-bigG/14's, with its projection), scheduler's
# training noise schedule, as published.
SDXL = Architecture(
    name="sdxl",
    unet_config=_frozen(dict(
        sample_size=128, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
        act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, addition_embed_type="text_time",
        addition_embed_type_num_heads=64, addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)),
    text_encoders=(
        ("CLIPTextModel", _frozen(dict(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
            attention_dropout=0.0, dropout=0.0, initializer_range=0.02, initializer_factor=1.0,
            bos_token_id=0, eos_token_id=2, pad_token_id=1))),
        ("CLIPTextModelWithProjection", _frozen(dict(
            vocab_size=49408, hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
            num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
            attention_dropout=0.0, dropout=0.0, initializer_range=0.02, initializer_factor=1.0,
            bos_token_id=0, eos_token_id=2, pad_token_id=1)))),
    scheduler_config=SD15.scheduler_config,  # the same scaled-linear 0.00085..0.012 training schedule
)

ARCHITECTURES: Dict[str, Architecture] = {SD15.name: SD15, SDXL.name: SDXL}


def get_architecture(name: Union[str, Architecture]) -> Architecture:
    """The architecture registered under `name` (an Architecture as it is)."""
    if isinstance(name, Architecture):
        return name
    if name not in ARCHITECTURES:
        raise ValueError(f"arch: unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def build_unet(arch: Union[str, Architecture], seed: int = 0,
               device: Optional[Union[str, torch.device]] = None) -> UNet2DConditionModel:
    """The architecture's U-Net with diffusers' default initialisation under `seed`, in eval mode (device "meta":
    no weights, no memory, for counting)."""
    import torch
    from diffusers import UNet2DConditionModel

    arch = get_architecture(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device or "cpu"):
            unet = UNet2DConditionModel(**arch.unet_config)
    return unet.eval()


def build_text_encoders(arch: Union[str, Architecture], seed: int = 0,
                        device: Optional[Union[str, torch.device]] = None) -> List[torch.nn.Module]:
    """The architecture's text encoders, randomly initialised under `seed` (encoder i under seed + i), in eval mode
    (device "meta" as in `build_unet`)."""
    import torch
    import transformers

    arch = get_architecture(arch)
    encoders = []
    for i, (class_name, config) in enumerate(arch.text_encoders):
        model_class = getattr(transformers, class_name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + i)
            with torch.device(device or "cpu"):
                encoders.append(model_class(model_class.config_class(**config)).eval())
    return encoders


def build_scheduler(arch: Union[str, Architecture]) -> DDPMScheduler:
    """The architecture's training noise scheduler."""
    from diffusers import DDPMScheduler

    arch = get_architecture(arch)
    return DDPMScheduler(**arch.scheduler_config)
