"""Training on an SDXL model (the tiny SDXL built in code): both text encoders' tokens, the size-and-crop time
ids, every method, and the model kind read from model_index.json."""
import json
from pathlib import Path

import pytest
import torch

from dcfast.io.images import write_shape_images
from dcfast.io.runs import Run
from dcfast.models.loading import check_model_dir, model_kind
from dcfast.models.tiny import tiny_xl
from dcfast.training.methods import METHODS
from dcfast.training.trainer import train

from conftest import tiny_config

# 24 x 18 photos at resolution 16: resized to 21 x 16, centre crop at left (21 - 16) // 2 = 2
PHOTO = (24, 18)  # (width, height)


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_xl")
    tiny_xl(seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("xl_concepts")
    return {w: write_shape_images(root / w, c, size=PHOTO) for w, c in {"dog": (200, 60, 20), "mug": (30, 60, 200)}.items()}


def xl_config(xl_dir, photos, out, method="lora", **fields):
    return tiny_config(xl_dir, photos, method, output_dir=str(out), **fields)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_two_sdxl_tasks(xl_dir, photos, tmp_path, method):
    result = train(xl_config(xl_dir, photos, tmp_path / "run", method), progress=False)
    assert len(result.task_dirs) == 2
    run = Run(tmp_path / "run")
    first, second = run.embeddings(2, 0), run.embeddings(2, 1)
    assert list(first) == list(second) == ["<v1>", "<v2>"]
    assert first["<v1>"].shape == (32,) and second["<v1>"].shape == (32,)
    metrics = run.metrics(2)
    assert metrics["token_change"] > 0
    assert (metrics["lora_change"] > 0) == (method not in ("ti",))


def _captured_time_ids(config):
    """The time ids of every training-step U-Net call, read by a forward pre-hook installed after the first step."""
    seen, handles = [], []

    def record(module, args, kwargs):
        added = kwargs.get("added_cond_kwargs")
        if added is not None and torch.is_grad_enabled():
            seen.append(added["time_ids"].detach().clone())

    def install(task, step, models):
        if not handles:
            handles.append(models.unet.register_forward_pre_hook(record, with_kwargs=True))

    try:
        train(config, step_callback=install, progress=False)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_time_ids_are_the_photos_size_and_crop(xl_dir, photos, tmp_path):
    """Centre crop: (original height, width, crop top, left, target height, width), as diffusers' SDXL
    DreamBooth-LoRA script computes them: (18, 24, 0, 2, 16, 16) for a 24 x 18 photo at resolution 16."""
    seen = _captured_time_ids(xl_config(xl_dir, photos, tmp_path / "run", max_train_steps=3))
    assert seen, "no training step reached the U-Net with added conditions"
    rows = torch.cat(seen)
    assert torch.equal(rows.unique(dim=0), torch.tensor([[18.0, 24, 0, 2, 16, 16]]))


def test_random_crop_and_flip_move_the_crop_ids(xl_dir, photos, tmp_path):
    seen = _captured_time_ids(xl_config(xl_dir, photos, tmp_path / "run", max_train_steps=6, center_crop=False,
                                        random_flip=True))
    rows = torch.cat(seen)
    assert set(rows[:, 3].tolist()) <= {0.0, 1.0, 2.0, 3.0, 4.0, 5.0} and len(set(rows[:, 3].tolist())) > 1
    assert torch.equal(rows[:, [0, 1, 2, 4, 5]].unique(dim=0), torch.tensor([[18.0, 24, 0, 16, 16]]))


def test_sdxl_resume_after_a_task_gives_the_same_run(xl_dir, photos, tmp_path):
    """A run killed after task 1 resumes both encoders' tokens and the method state: task 2 comes out the same."""
    import shutil

    whole = train(xl_config(xl_dir, photos, tmp_path / "whole", "ewc-dc"), progress=False)
    shutil.copytree(whole.output_dir, tmp_path / "part")
    shutil.rmtree(tmp_path / "part" / "task_2")
    train(xl_config(xl_dir, photos, tmp_path / "part", "ewc-dc", resume_from_checkpoint="latest"), progress=False)
    for encoder in (0, 1):
        a, b = Run(whole.output_dir).embeddings(2, encoder), Run(tmp_path / "part").embeddings(2, encoder)
        for token in a:
            assert torch.allclose(a[token], b[token], rtol=1e-5, atol=1e-6 * float(a[token].abs().max()))


@pytest.mark.parametrize("name, expected", [
    ("StableDiffusionXLImg2ImgPipeline", "refiner"),
    ("StableDiffusionXLInpaintPipeline", "inpainting"),
    ("StableDiffusionInpaintPipeline", "inpainting"),
    ("KandinskyV22Pipeline", "does not know"),
])
def test_unsupported_pipelines_are_refused_by_class_before_loading(tmp_path, name, expected):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": name}))
    with pytest.raises(ValueError, match=f"{name}.*{expected}.*StableDiffusionXLPipeline"):
        check_model_dir(tmp_path)


def test_model_kind_reads_model_index(xl_dir, model_dir):
    assert model_kind(xl_dir) == "sdxl"
    assert model_kind(model_dir) == "sd"


def test_sdxl_export_loads_into_a_plain_sdxl_pipeline(xl_dir, photos, tmp_path):
    """The exported LoRA and both encoders' tokens, loaded by the model card's code into StableDiffusionXLPipeline,
    give the model dcfast trained: the same conditions and U-Net output; each token stays one id; it generates."""
    import re

    from dcfast.cli.main import main
    from dcfast.io.runs import load_pipeline
    from dcfast.eval.sampling import default_time_ids, pipeline_conditions

    train(xl_config(xl_dir, photos, tmp_path / "run", "ewc-dc"), progress=False)
    out = tmp_path / "export"
    assert main(["export", "--run", str(tmp_path / "run"), "--output", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "StableDiffusionXLPipeline" in card and "stable-diffusion-xl" in card
    code = re.search(r"## Loading with diffusers.*?```python\n(.*?)```", card, re.S).group(1)
    assert "dcfast" not in code
    namespace = {}
    exec(compile(code, "model card loading code", "exec"), namespace)
    plain, ours = namespace["pipe"], load_pipeline(tmp_path / "run", 2)
    assert type(plain).__name__ == "StableDiffusionXLPipeline"
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    outputs = []
    for pipe in (plain, ours):
        for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
            assert tokenizer.tokenize("a photo of <v1> dog <v2>") == ["a</w>", "photo</w>", "of</w>", "<v1>", "dog</w>", "<v2>"]
        conds = pipeline_conditions(pipe, ["a photo of <v2> mug"])
        with torch.no_grad():
            outputs.append(pipe.unet(latents, torch.tensor([500, 100]), **conds[0].unet_kwargs(2, default_time_ids(pipe))).sample)
    scale = outputs[1].abs().max()
    assert (outputs[0] - outputs[1]).abs().max() <= 1e-5 * scale
    plain.unload_lora_weights()  # the LoRA loaded is what moves the output, not only the tokens
    with torch.no_grad():
        unadapted = plain.unet(latents, torch.tensor([500, 100]),
                               **pipeline_conditions(plain, ["a photo of <v2> mug"])[0].unet_kwargs(2, default_time_ids(plain))).sample
    assert (unadapted - outputs[0]).abs().max() > 1e2 * max((outputs[0] - outputs[1]).abs().max(), 1e-7 * scale)
    plain.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
    image = plain("a photo of <v1> dog", num_inference_steps=2, height=16, width=16, output_type="np").images
    assert image.shape == (1, 16, 16, 3) and image.std() > 0


@pytest.mark.parametrize("method", ["ewc-dc", "dsc"])
def test_dc_checkpoint_trains_the_same_model(xl_dir, photos, tmp_path, method):
    """dc_checkpoint recomputes each DC chunk in the backward: the run's LoRA comes out as without it."""
    from dcfast.io.runs import load_tensors, task_dir

    states = []
    for bounded in (False, True):
        out = tmp_path / f"run-{bounded}"
        train(xl_config(xl_dir, photos, out, method, dc_max_batch=3, dc_checkpoint=bounded), progress=False)
        states.append(load_tensors(task_dir(out, 2) / "trainer_state.safetensors"))
    plain, bounded = states
    assert set(plain) == set(bounded)
    for name, value in plain.items():
        assert torch.allclose(bounded[name], value, rtol=1e-4, atol=1e-5 * float(value.abs().max()) + 1e-12), name


def test_dc_checkpoint_needs_a_chunk_size(xl_dir, photos, tmp_path):
    with pytest.raises(ValueError, match="dc_checkpoint.*dc_max_batch"):
        xl_config(xl_dir, photos, tmp_path / "run", "ewc-dc", dc_checkpoint=True).validate()
