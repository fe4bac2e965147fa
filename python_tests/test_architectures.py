"""Real architectures built in code (`dcfast.models.architectures`): SD 1.5's and SDXL's published configs, checked
against the diffusers and transformers signatures, on the meta device (no weights, no memory)."""
import inspect

import pytest

from dcfast.models.architectures import (ARCHITECTURES, SD15, SDXL, build_scheduler, build_text_encoders,
                                         build_unet, get_architecture)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_unet_key_is_a_diffusers_argument(name):
    from diffusers import UNet2DConditionModel

    accepted = set(inspect.signature(UNet2DConditionModel.__init__).parameters)
    assert set(get_architecture(name).unet_config) <= accepted


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_text_config_key_reaches_the_config(name):
    import transformers

    for class_name, config in get_architecture(name).text_encoders:
        built = getattr(transformers, class_name).config_class(**config).to_dict()
        assert {key: built[key] for key in config} == dict(config)


def test_sd15_is_sd15_at_full_size():
    unet = build_unet("sd15", device="meta")
    (text_encoder,) = build_text_encoders("sd15", device="meta")
    # SD 1.5's published parameter counts: U-Net 859.52M, CLIP ViT-L/14 text tower 123.06M
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in text_encoder.parameters()) == 123_060_480
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size == SD15.cross_attention_dim == 768
    assert tuple(unet.config.block_out_channels) == (320, 640, 1280, 1280)
    assert SD15.latent_size == 64
    assert build_scheduler("sd15").config.beta_schedule == "scaled_linear"


def test_sdxl_is_sdxl_at_full_size():
    unet = build_unet("sdxl", device="meta")
    clip_l, clip_g = build_text_encoders("sdxl", device="meta")
    # SDXL base 1.0's published parameter counts: U-Net 2.567B, CLIP ViT-L/14 123.06M, OpenCLIP ViT-bigG/14 694.66M
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    assert sum(p.numel() for p in clip_l.parameters()) == 123_060_480
    assert sum(p.numel() for p in clip_g.parameters()) == 694_659_840
    assert type(clip_g).__name__ == "CLIPTextModelWithProjection"
    # cross-attention reads both encoders' states side by side; the added embedding the pooled one and 6 time ids
    assert SDXL.cross_attention_dim == clip_l.config.hidden_size + clip_g.config.hidden_size == 2048
    assert unet.config.projection_class_embeddings_input_dim == clip_g.config.projection_dim + 6 * 256
    assert SDXL.is_sdxl and not SD15.is_sdxl and SDXL.latent_size == 128
    assert build_scheduler("sdxl").config.beta_end == 0.012


def test_text_flops_count_every_layer():
    from dcfast.bench.flops import text_flops

    clip_l, clip_g = build_text_encoders("sdxl", device="meta")
    for encoder in (clip_l, clip_g):
        c, t = encoder.config, 77
        per_layer = 4 * 2 * t * c.hidden_size ** 2 + 2 * 2 * t * c.hidden_size * c.intermediate_size  # q k v o, mlp
        per_layer += 4 * t * t * c.hidden_size  # QK^T and AV
        projection = 2 * c.hidden_size * c.projection_dim if hasattr(encoder, "text_projection") else 0  # pooled
        assert text_flops(encoder, t) == pytest.approx(c.num_hidden_layers * per_layer + projection, rel=1e-12)


def test_sdxl_flops_match_the_recorded_table():
    from dcfast.bench.flops import row_flops

    # benchmarks/RESULTS.md: SDXL at 32x32 latents, 427.8 GFLOP per U-Net row (the row runs with its added conditions)
    assert row_flops(build_unet("sdxl", device="meta"), 32, 77)["total"] / 1e9 == pytest.approx(427.785, abs=0.01)


def test_sd15_flops_match_the_recorded_table():
    from dcfast.bench.flops import row_flops, sd15_meta_unet

    # benchmarks/RESULTS.md: SD 1.5 at 64x64 latents, 803 GFLOP per U-Net row
    assert row_flops(sd15_meta_unet(), 64, 77)["total"] / 1e9 == pytest.approx(803, abs=0.5)


def test_weights_are_seeded():
    import torch

    first, second = build_text_encoders("sd15", seed=3), build_text_encoders("sd15", seed=3)
    assert torch.equal(first[0].get_input_embeddings().weight, second[0].get_input_embeddings().weight)


def test_unknown_architecture_names_the_choices():
    with pytest.raises(ValueError, match="sd15"):
        get_architecture("sd3")
