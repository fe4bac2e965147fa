"""dcfast.models.loading: the tiny SD-layout pipeline, saving it, and loading a local diffusers directory."""
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline

from dcfast.models.loading import load_components

from dcfast.models.tiny import tiny


def test_tiny_tokenizer_knows_prompt_words_and_added_tokens():
    tokenizer = tiny().tokenizer
    assert tokenizer.tokenize("a photo of my dog") == ["a</w>", "photo</w>", "of</w>", "my</w>", "dog</w>"]
    tokenizer.add_tokens("<v1>")
    assert tokenizer.tokenize("a photo of <v1> dog") == ["a</w>", "photo</w>", "of</w>", "<v1>", "dog</w>"]
    assert tokenizer.model_max_length == 77


def test_saved_tiny_loads_through_both_paths_and_generates(model_dir):
    components = load_components(model_dir)
    assert components.vae is not None and components.resolution == 16
    assert type(components.noise_scheduler).__name__ == "DDPMScheduler"
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True)
    image = pipe("a photo of a dog", num_inference_steps=1, height=16, width=16, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (16, 16, 3)


def test_model_without_vae_is_pixel_space(model_dir, tmp_path):
    shutil.copytree(model_dir, tmp_path / "m")
    shutil.rmtree(tmp_path / "m" / "vae")
    components = load_components(tmp_path / "m")
    assert components.vae is None and components.resolution == components.unet.config.sample_size


@pytest.mark.parametrize("missing", ["unet", "tokenizer"])
def test_missing_subfolder_is_named(model_dir, tmp_path, missing):
    shutil.copytree(model_dir, tmp_path / "m")
    shutil.rmtree(tmp_path / "m" / missing)
    with pytest.raises(ValueError, match=f"no {missing}/ subfolder"):
        load_components(tmp_path / "m")


def test_missing_model_dir(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        load_components(tmp_path / "nowhere")


def test_tiny_tokenizer_keeps_every_word_whole():
    from dcfast.models.tiny import TINY_WORDS, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    split = [word for word in TINY_WORDS if tokenizer.tokenize(word) != [word + "</w>"]]
    assert not split, f"split into several tokens: {split}"


def test_model_fingerprint_follows_the_weights_not_the_path(model_dir, tmp_path, monkeypatch):
    from dcfast.models import loading as models

    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    fingerprint = models.model_fingerprint(model_dir)
    assert fingerprint.startswith("sha256:") and models.model_fingerprint(copy) == fingerprint
    assert load_components(copy).fingerprint == fingerprint
    (copy / "model_index.json").write_text("{}")  # outside the weights, tokenizer and scheduler: not counted
    assert models.model_fingerprint(copy) == fingerprint
    scheduler_file = copy / "scheduler" / "scheduler_config.json"
    scheduler_file.write_text(scheduler_file.read_text().replace('"num_train_timesteps": 1000', '"num_train_timesteps": 999'))
    assert models.model_fingerprint(copy) != fingerprint
    # a weight file above the whole-file size is read by its size, head and tail: a change at its end counts
    shutil.rmtree(copy)
    shutil.copytree(model_dir, copy)
    monkeypatch.setattr(models, "FINGERPRINT_WHOLE", 64)
    small_reads = models.model_fingerprint(copy)
    weights = next((copy / "unet").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert models.model_fingerprint(copy) != small_reads
