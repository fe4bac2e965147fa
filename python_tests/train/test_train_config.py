"""dcfast.config: YAML loading, CLI overrides, and a message naming field and fix for every bad config."""
import shutil

import pytest
import yaml
from PIL import Image

from dcfast.cli import build_parser
from dcfast.cli_train import config_from_args
from dcfast.config import TrainConfig


def test_yaml_then_flags_override(tmp_path, model_dir, concepts):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "pretrained_model_name_or_path": str(model_dir), "output_dir": str(tmp_path / "out"), "method": "ewc-dc",
        "tasks": [{"images": str(concepts["dog"]), "class_word": "dog"},
                  {"images": str(concepts["mug"]), "class_word": "mug", "prompt": "{token} {class_word} on a desk"}],
        "max_train_steps": 200}))
    args = build_parser().parse_args(["train", "--config", str(path), "--method", "ewc", "--rank", "8",
                                      "--learning_rate", "3e-4", "--max_train_steps", "7", "--train_batch_size", "1",
                                      "--mixed_precision", "bf16", "--seed", "5", "--resume_from_checkpoint", "latest"])
    config = config_from_args(args)
    assert (config.method, config.rank, config.learning_rate, config.max_train_steps) == ("ewc", 8, 3e-4, 7)
    assert (config.train_batch_size, config.mixed_precision, config.seed) == (1, "bf16", 5)
    assert config.resume_from_checkpoint == "latest"
    assert config.tasks[1].prompt == "{token} {class_word} on a desk" and config.tasks[0].class_word == "dog"
    assert config.resolved_lora_alpha() == 8
    config.override(resume_from_checkpoint=None).validate()


def test_unknown_yaml_keys_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['learning_rat'\]"):
        TrainConfig.from_dict({"learning_rat": 1e-4})
    with pytest.raises(ValueError, match=r"tasks\[0\]: missing class_word"):
        TrainConfig.from_dict({"tasks": [{"images": "x"}]})


def _bad(make_config, tmp_path, case):
    """Build the config of one bad case."""
    if case == "missing folder":
        return make_config(tasks=[{"images": str(tmp_path / "nope"), "class_word": "dog"}])
    folder = tmp_path / "imgs"
    folder.mkdir()
    if case == "folder without images":
        (folder / "a.txt").write_text("x")
    elif case == "unreadable image":
        (folder / "bad.png").write_bytes(b"garbage")
    elif case == "truncated image":
        Image.new("RGB", (32, 32), (1, 2, 3)).save(folder / "full.png")
        data = (folder / "full.png").read_bytes()
        (folder / "cut.png").write_bytes(data[: len(data) // 2])
        (folder / "full.png").unlink()
    return make_config(tasks=[{"images": str(folder), "class_word": "dog"}])


@pytest.mark.parametrize("case, expected", [
    ("missing folder", r"tasks\[0\]\.images: image folder .*nope' does not exist; create it or fix the path"),
    ("folder without images", r"tasks\[0\]\.images: folder .*imgs' contains no images"),
    ("unreadable image", r"tasks\[0\]\.images: cannot read image .*bad\.png.*replace or remove it"),
    ("truncated image", r"tasks\[0\]\.images: cannot read image .*cut\.png.*truncated"),
])
def test_bad_images(make_config, tmp_path, case, expected):
    with pytest.raises(ValueError, match=expected):
        _bad(make_config, tmp_path, case).validate()


@pytest.mark.parametrize("fields, expected", [
    ({"method": "ewc_dcx"}, r"method: unknown method 'ewc_dcx'; choose one of lora, ewc, ewc-dc, dsc, dsc\+ewc-dc, c-lora"),
    ({"max_train_steps": -1}, r"max_train_steps: must be an integer >= 0, got -1"),
    ({"train_batch_size": 0}, r"train_batch_size: must be an integer >= 1"),
    ({"learning_rate": -1.0}, r"learning_rate: must be a number > 0"),
    ({"gamma": 1.5}, r"gamma: the Fisher decay must lie in \[0, 1\]"),
    ({"mixed_precision": "fp8"}, r"mixed_precision: 'fp8' is not one of no, fp16, bf16"),
    ({"tasks": []}, r"tasks: no tasks; add at least one"),
    ({"pretrained_model_name_or_path": ""}, r"pretrained_model_name_or_path: not set"),
    ({"resume_from_checkpoint": "/no/such/dir"}, r"resume_from_checkpoint: '/no/such/dir' is neither 'latest'"),
    ({"temperature": "warm"}, r"temperature: must be a number > 0 or 'auto', got 'warm'"),
    ({"temperature": 0.0}, r"temperature: must be a number > 0 or 'auto', got 0.0"),
    ({"auto_temperature_scale": 0}, r"auto_temperature_scale: must be a number > 0"),
    ({"dc_push": "pull"}, r"dc_push: 'pull' is not one of spec, complement, none"),
    ({"dc_label_smoothing": 1.0}, r"dc_label_smoothing: must lie in \[0, 1\), got 1.0"),
    ({"dc_c0_weight": -1.0}, r"dc_c0_weight: must be a number >= 0, got -1.0"),
    ({"fisher_normalize": "max"}, r"fisher_normalize: 'max' is not one of mean, none"),
    ({"dsc_teacher_pool": "latest"}, r"dsc_teacher_pool: 'latest' is not one of before_distill, after_distill"),
    ({"dsc_ewc_penalty": "yes"}, r"dsc_ewc_penalty: must be true or false, got 'yes'"),
    ({"num_dc_concepts": 1}, r"num_dc_concepts: must be an integer >= 2, got 1"),
])
def test_bad_fields(make_config, fields, expected):
    with pytest.raises(ValueError, match=expected):
        make_config(**fields).validate()


@pytest.mark.parametrize("fields", [
    {"temperature": "auto"}, {"temperature": 0.05}, {"temperature": 2}, {"dc_push": "spec"}, {"dc_push": "none"},
    {"dc_label_smoothing": 0.1, "dc_c0_weight": 0.0}, {"fisher_normalize": "none"},
    {"dsc_teacher_pool": "after_distill", "dsc_ewc_penalty": False}, {"num_dc_concepts": 2, "method": "dsc"}])
def test_good_dc_fields(make_config, fields):
    make_config(**fields).validate()


def test_model_dir_without_unet(make_config, model_dir, tmp_path):
    shutil.copytree(model_dir, tmp_path / "m")
    shutil.rmtree(tmp_path / "m" / "unet")
    with pytest.raises(ValueError, match=r"pretrained_model_name_or_path: model directory .* has no unet/ subfolder"):
        make_config(pretrained_model_name_or_path=str(tmp_path / "m")).validate()


def test_every_problem_is_listed_at_once(make_config):
    with pytest.raises(ValueError) as error:
        make_config(method="nope", max_train_steps=-3, rank=0).validate()
    assert all(f in str(error.value) for f in ("method:", "max_train_steps:", "rank:"))


def test_prompt_template_needs_token(make_config, concepts):
    with pytest.raises(ValueError, match=r"tasks\[0\]\.prompt: 'a photo of a dog' has no \{token\} placeholder"):
        make_config(tasks=[{"images": str(concepts["dog"]), "class_word": "dog", "prompt": "a photo of a dog"}]).validate()
