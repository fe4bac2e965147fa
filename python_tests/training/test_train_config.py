"""dcfast.training.config: YAML loading, CLI overrides, and a message naming field and fix for every bad config."""
import shutil

import pytest
import yaml
from PIL import Image

from dcfast.cli.main import build_parser
from dcfast.cli.train import config_from_args
from dcfast.training.config import TrainConfig


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
    ({"fisher_normalize": "max"}, r"fisher_normalize: 'max' is not one of mean, none, merged"),
    ({"dsc_teacher_pool": "latest"}, r"dsc_teacher_pool: 'latest' is not one of before_distill, after_distill"),
    ({"lr_scheduler": "cosine_typo"}, r"lr_scheduler: 'cosine_typo' is not one of constant, constant_with_warmup, "
                                      r"linear, cosine, cosine_with_restarts, polynomial"),
    ({"report_to": "neptune"}, r"report_to: 'neptune' is not one of tensorboard, wandb, comet_ml, all, aim, mlflow, "
                               r"clearml, dvclive, swanlab, trackio; or leave it unset"),
    ({"dc_loss": "l3"}, r"dc_loss: 'l3' is not one of l2, l1, huber"),
    ({"resolution": 0}, r"resolution: must be an integer > 0 and a multiple of 8 .*got 0"),
    ({"resolution": 20}, r"resolution: must be an integer > 0 and a multiple of 8 .*got 20"),
    ({"pretrained_concept_prompt": "a photo"}, r"pretrained_concept_prompt: 'a photo' has no \{class_word\} placeholder"),
    ({"num_dc_concepts": 1}, r"num_dc_concepts: must be an integer >= 2, got 1"),
    ({"fisher_temperature": "end"}, r"fisher_temperature: 'end' is not one of task, task_end"),
    ({"fisher_temperature": "task_end", "temperature": 0.05},
     r"fisher_temperature: 'task_end' re-measures the auto tau, but temperature is 0.05; set temperature: auto"),
])
def test_bad_fields(make_config, fields, expected):
    with pytest.raises(ValueError, match=expected):  # dsc+ewc-dc reads every setting these cases name
        make_config(**{"method": "dsc+ewc-dc", **fields}).validate()


@pytest.mark.parametrize("fields", [
    {"temperature": "auto"}, {"temperature": 0.05}, {"temperature": 2}, {"dc_push": "spec"}, {"dc_push": "none"},
    {"dc_label_smoothing": 0.1, "dc_c0_weight": 0.0}, {"fisher_normalize": "none"}, {"fisher_temperature": "task_end"},
    {"dsc_teacher_pool": "after_distill", "dsc_ewc_penalty": False}, {"num_dc_concepts": 2, "method": "dsc"}])
def test_good_dc_fields(make_config, fields):
    make_config(**{"method": "dsc+ewc-dc", **fields}).validate()


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


# --- YAML values, renamed fields, every field a flag (issue 13) ---------------------------------------------

def _yaml(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_numbers_written_as_exponents_are_numbers(tmp_path):
    """PyYAML reads 1e-4 and 1e2 (no dot) as strings: they become the field's number type."""
    config = TrainConfig.from_yaml(_yaml(tmp_path, "method: dsc\nlearning_rate: 1e-4\nmax_train_steps: 1e2\n"
                                                   "temperature: 5e-3\ndsc_learning_rate: 2E-5\nmixed_precision: no\n"
                                                   "resolution: 64\n"))
    assert config.learning_rate == 1e-4 and isinstance(config.learning_rate, float)
    assert config.max_train_steps == 100 and isinstance(config.max_train_steps, int)
    assert config.method_settings.temperature == 5e-3 and config.method_settings.dsc_learning_rate == 2e-5
    assert config.mixed_precision == "no"  # YAML 1.1 reads a bare `no` as false
    assert config.resolution == 64


@pytest.mark.parametrize("text, expected", [
    ("learning_rate: fast\n", r"learning_rate: must be a number, got 'fast' \(text\); e\.g\. learning_rate: 0\.0001"),
    ("max_train_steps: 2.5\n", r"max_train_steps: must be an integer, got 2\.5"),
    ("method: dsc+ewc-dc\ndsc_ewc_penalty: 'yes'\n", r"dsc_ewc_penalty: must be true or false, got 'yes'"),
    ("method: 3\n", r"method: must be text, got 3 \(int\); put it in quotes"),
    ("tasks: ok\n", r"tasks: must be a list of mappings like \[\{images: photos/dog, class_word: dog\}\], got 'ok' \(str\)"),
    ("target_modules: to_q\n", r"target_modules: must be a list of names"),
])
def test_yaml_values_of_the_wrong_type(tmp_path, text, expected):
    with pytest.raises(TypeError, match=expected):
        TrainConfig.from_yaml(_yaml(tmp_path, text))


def test_yaml_syntax_error_names_file_line_and_hint(tmp_path):
    path = _yaml(tmp_path, "method: lora\ntasks: [{images: a, class_word: dog\nseed: 1\n")
    with pytest.raises(ValueError) as error:
        TrainConfig.from_yaml(path)
    message = str(error.value)
    assert str(path) in message and "line 3" in message and "YAML syntax error" in message
    assert "unclosed { or [" in message


def test_class_prompt_was_renamed(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"class_prompt: this field was renamed to pretrained_concept_prompt"):
        TrainConfig.from_yaml(_yaml(tmp_path, "class_prompt: 'a photo of a {class_word}'\n"))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--class_prompt", "a {class_word}"])
    assert "--class_prompt was renamed to --pretrained_concept_prompt" in capsys.readouterr().err


def test_eval_images_need_two_held_out_images(make_config, concepts, tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(one / "a.png")
    with pytest.raises(ValueError, match=r"tasks\[0\]\.eval_images: folder .*one' holds 1 image; .* at least 2"):
        make_config(tasks=[{"images": str(concepts["dog"]), "class_word": "dog", "eval_images": str(one)}]).validate()
    with pytest.raises(ValueError, match=r"tasks\[0\]\.eval_images: .* is the training folder itself"):
        make_config(tasks=[{"images": str(concepts["dog"]), "class_word": "dog",
                            "eval_images": str(concepts["dog"]) + "/"}]).validate()


def test_every_field_is_a_flag_with_its_reason_as_help(capsys):
    import dataclasses

    from dcfast.training.methods import REGISTRY
    from dcfast.training.settings import field_help

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for cls in [TrainConfig] + [method.Settings for _, method in REGISTRY]:  # shared fields, every method's settings
        helps = field_help(cls)
        for f in dataclasses.fields(cls):
            if f.name == "method_settings":
                continue
            assert f"--{f.name}" in text, f.name
            assert helps[f.name] and " ".join(helps[f.name].split())[:40] in text, f.name
    assert field_help(TrainConfig)["token_learning_rate"] == ("the modifier token learns a 768-dim vector from few "
                                                              "photos: faster")
    ewc_dc = dict(REGISTRY)["ewc-dc"].Settings
    assert field_help(ewc_dc)["temperature"].startswith("tau: a number, or \"auto\"")  # a comment block above it
    assert "settings of method ewc-dc, dsc, dsc+ewc-dc" in text  # each setting listed under the methods reading it


def test_flags_of_every_kind_parse_to_the_field_type(tmp_path):
    args = build_parser().parse_args([
        "train", "--method", "dsc+ewc-dc", "--resolution", "32", "--adam_beta2", "0.99", "--temperature", "auto",
        "--no-dsc_ewc_penalty",
        "--target_modules", "to_q", "to_v", "--lr_scheduler", "cosine", "--tasks", "[{images: a, class_word: dog}]",
        "--pretrained_concept_prompt", "a {class_word}", "--eval_every_task"])
    config = config_from_args(args)
    assert (config.resolution, config.adam_beta2, config.method_settings.temperature) == (32, 0.99, "auto")
    assert config.method_settings.dsc_ewc_penalty is False and config.eval_every_task is True
    assert config.target_modules == ["to_q", "to_v"] and config.lr_scheduler == "cosine"
    assert config.tasks[0].images == "a" and config.tasks[0].class_word == "dog"
    assert config.pretrained_concept_prompt == "a {class_word}"
    assert config_from_args(build_parser().parse_args(["train", "--temperature", "0.5"])).method_settings.temperature == 0.5


def test_choice_flags_list_their_choices(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--lr_scheduler", "cosine_typo"])
    assert "invalid choice: 'cosine_typo'" in capsys.readouterr().err


def test_help_imports_no_torch():
    """`dcfast --help` builds every parser without torch (its compiler imports took 2 s of 3.9)."""
    import subprocess
    import sys

    code = "import sys, dcfast.cli.main; dcfast.cli.main.build_parser(); print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
