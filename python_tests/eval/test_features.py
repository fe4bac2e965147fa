"""dcfast.eval.features: the deterministic default extractor and CLIP loading from local directories."""
import json

import pytest
import torch

from dcfast.eval.features import ClipFeatures, RandomConvFeatures, cosine_i2i, load_features

VISION = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32,
              patch_size=8, projection_dim=16)


def test_default_features_are_deterministic_and_named():
    images = torch.rand(3, 3, 40, 50, generator=torch.Generator().manual_seed(0))
    a, b = load_features(None)(images), RandomConvFeatures()(images)
    assert a.shape == (3, 454) and torch.equal(a, b)
    assert "not CLIP" in RandomConvFeatures.name
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        a = RandomConvFeatures()(torch.rand(3, 1, 8, 8))


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPVisionConfig, CLIPVisionModelWithProjection

    root = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION)).save_pretrained(root / "vision")
    text = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=99,
                projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    StableDiffusionSafetyChecker(CLIPConfig(text_config=text, vision_config=VISION, projection_dim=16)) \
        .save_pretrained(root / "sd" / "safety_checker")
    return root


@pytest.mark.parametrize("sub", ["vision", "sd/safety_checker", "sd"], ids=["clip-vision", "safety-checker", "sd-root"])
def test_clip_features_load_locally(clip_dirs, sub):
    features = load_features(clip_dirs / sub)
    assert isinstance(features, ClipFeatures) and features.clip
    emb = features(torch.rand(2, 3, 48, 40))
    assert emb.shape == (2, 16)
    assert cosine_i2i(emb, emb) <= 1 + 1e-9 and cosine_i2i(emb[:1], emb[:1]) == pytest.approx(1.0)


def test_clip_errors_name_the_path(tmp_path, clip_dirs):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_features(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_features(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps(json.loads((clip_dirs / "vision" / "config.json").read_text())))
    with pytest.raises(ValueError, match="broken"):
        load_features(broken)  # config without weights
