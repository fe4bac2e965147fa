"""Real architectures built in code (`dcfast.models.architectures`): SD 1.5's published configs, checked against the
diffusers and transformers signatures, on the meta device (no weights, no memory)."""
import inspect

import pytest

from dcfast.models.architectures import (ARCHITECTURES, SD15, build_scheduler, build_text_encoders, build_unet,
                                         get_architecture)


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
