"""Watching a run: what the trackers receive (per-step losses and parts, DSC terms, validation images), the
validation grids, losses.json, the loss curve, and the tracker checks made before any model loads."""
import math

import numpy as np
import pytest
from accelerate.tracking import GeneralTracker
from PIL import Image

from dcfast.io.runs import read_json, task_dir


class RecordingTracker(GeneralTracker):
    """An accelerate tracker that keeps what it is sent (stands in for tensorboard / wandb, not installed here)."""

    name = "recording"
    requires_logging_directory = False

    def __init__(self):
        super().__init__()
        self.scalars, self.images, self.config, self.finished = [], [], None, False

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values):
        self.config = dict(values)

    def log(self, values, step=None, **kwargs):
        self.scalars.append((step, dict(values)))

    def log_images(self, values, step=None, **kwargs):
        self.images.append((step, {k: list(v) for k, v in values.items()}))

    def finish(self):
        self.finished = True


@pytest.fixture(scope="module")
def watched(tmp_path_factory, model_dir, concepts):
    """One 2-task DSC+EWC-DC run with validation prompts, logged to a RecordingTracker."""
    import dcfast.training.trainer as trainer
    from dcfast.training.config import TrainConfig

    out = tmp_path_factory.mktemp("watched") / "run"
    config = TrainConfig.from_dict(dict(
        pretrained_model_name_or_path=str(model_dir), output_dir=str(out), method="dsc+ewc-dc",
        tasks=[{"images": str(concepts["dog"]), "class_word": "dog"}, {"images": str(concepts["mug"]), "class_word": "mug"}],
        max_train_steps=3, train_batch_size=2, checkpointing_steps=100, num_dc_timesteps=2, num_dc_concepts=3,
        fisher_num_timesteps=1, fisher_batch_size=2, dsc_iterations=2, learning_rate=1e-3,
        validation_prompts=["a photo of {token} {class_word}", "a photo of <v2> mug", "a photo of a dog"],
        num_validation_images=2, validation_inference_steps=2, validation_guidance_scale=3.0))
    tracker = RecordingTracker()
    original = trainer._log_with
    trainer._log_with = lambda config: [tracker]
    try:
        result = trainer.train(config)
    finally:
        trainer._log_with = original
    return config, tracker, result


def test_each_training_step_logs_its_loss_and_parts(watched):
    config, tracker, result = watched
    train = {step: values for step, values in tracker.scalars if "loss" in values}
    per_task = config.max_train_steps + config.method_settings.dsc_iterations  # run-wide: task n starts at (n-1)*per_task
    assert sorted(train) == [1, 2, 3, per_task + 1, per_task + 2, per_task + 3]
    for step, values in train.items():
        assert {"loss/denoise", "loss/dc", "loss/penalty", "lr", "task"} <= set(values)
        total = values["loss/denoise"] + config.method_settings.delta * values["loss/dc"] + values["loss/penalty"]
        assert values["loss"] == pytest.approx(total, rel=1e-5)
        assert values["task"] == (1 if step <= per_task else 2)
    assert all(train[s]["loss/penalty"] == 0 for s in (1, 2, 3))  # no Fisher before task 1 ends
    assert any(train[per_task + s]["loss/penalty"] > 0 for s in (2, 3))  # the LoRA moved away from its anchor
    for n in (1, 2):
        saved = read_json(task_dir(config.output_dir, n) / "losses.json")
        logged = [train[(n - 1) * per_task + s] for s in (1, 2, 3)]
        assert saved["first_step"] == (n - 1) * per_task
        assert saved["train"]["loss"] == [v["loss"] for v in logged]
        assert saved["train"]["dc"] == [v["loss/dc"] for v in logged]
        assert result.metrics[n - 1]["final_loss"] == logged[-1]["loss"]


def test_each_distillation_iteration_logs_the_dsc_terms(watched):
    config, tracker, result = watched
    per_task = config.max_train_steps + config.method_settings.dsc_iterations
    distill = {step: values for step, values in tracker.scalars if any(k.startswith("distill/") for k in values)}
    assert sorted(distill) == [per_task + config.max_train_steps + 1, per_task + config.max_train_steps + 2]  # task 2 only
    for values in distill.values():
        terms = {k.split("/", 1)[1]: v for k, v in values.items()}
        assert set(terms) == {"dsc_kl_t1", "dsc_kl_t2", "dsc_mse_t1", "dsc_mse_t2", "dsc_loss", "dsc_penalty"}
        settings = config.method_settings
        expected = (settings.dsc_alpha * (terms["dsc_kl_t1"] + terms["dsc_kl_t2"])
                    + settings.dsc_beta * (terms["dsc_mse_t1"] + terms["dsc_mse_t2"]))
        assert terms["dsc_loss"] == pytest.approx(expected, rel=1e-5)
        assert terms["dsc_penalty"] > 0
    last = {k.split("/", 1)[1]: v for k, v in distill[max(distill)].items()}
    for key in ("dsc_kl_t1", "dsc_mse_t2", "dsc_loss", "dsc_penalty"):  # the distiller's own report of its last step
        assert result.metrics[1][key] == last[key]
    saved = read_json(task_dir(config.output_dir, 2) / "losses.json")["distill"]
    assert saved["dsc_loss"] == [distill[s]["distill/dsc_loss"] for s in sorted(distill)]
    assert read_json(task_dir(config.output_dir, 1) / "losses.json")["distill"] == {}


def test_validation_grids_and_tracker_images(watched):
    config, tracker, _ = watched
    per_task = config.max_train_steps + config.method_settings.dsc_iterations
    assert [step for step, _ in tracker.images] == [per_task, 2 * per_task]
    rows_per_task = {1: ["validation/prompt_0", "validation/prompt_1"],  # "<v2> mug" waits for task 2
                     2: ["validation/prompt_0", "validation/prompt_1", "validation/prompt_2"]}
    side, gap = 16, 2
    for n, (_, images) in zip((1, 2), tracker.images):
        assert sorted(images) == rows_per_task[n]
        grid = np.asarray(Image.open(task_dir(config.output_dir, n) / "validation.png"))
        rows = len(rows_per_task[n])
        assert grid.shape == (rows * (side + gap) - gap, 2 * (side + gap) - gap, 3)
        for i, key in enumerate(rows_per_task[n]):
            assert len(images[key]) == config.num_validation_images
            for j, image in enumerate(images[key]):
                tile = grid[i * (side + gap):i * (side + gap) + side, j * (side + gap):j * (side + gap) + side]
                assert np.array_equal(tile, np.asarray(image))
    assert tracker.finished and tracker.config["method"] == "dsc+ewc-dc"


def test_loss_curve_png_at_the_end(watched):
    config, _, result = watched
    assert result.loss_curve == task_dir(config.output_dir, 1).parent / "loss_curve.png"
    with Image.open(result.loss_curve) as image:
        assert image.format == "PNG" and image.size[0] > 200 and image.size[1] > 100


def test_report_to_checked_against_installed_trackers(make_config, monkeypatch):
    import accelerate.tracking
    from accelerate.utils import LoggerType

    monkeypatch.setattr(accelerate.tracking, "_available_trackers", [])
    with pytest.raises(ValueError, match=r"report_to: 'all' logs to every installed tracker, but none is installed; "
                                         r"pip install tensorboard"):
        make_config(report_to="all").validate()
    monkeypatch.setattr(accelerate.tracking, "_available_trackers", [LoggerType.TENSORBOARD])
    make_config(report_to="all").validate()
    make_config(report_to="tensorboard").validate()
    with pytest.raises(ValueError, match=r"report_to: wandb is not installed \(installed trackers: tensorboard\); "
                                         r"pip install wandb, or leave report_to unset"):
        make_config(report_to="wandb").validate()


@pytest.mark.parametrize("fields, expected", [
    ({"validation_prompts": ["a photo of <v1> dog", " "]}, r"validation_prompts: must be a list of non-empty prompts"),
    ({"validation_prompts": ["x"], "num_validation_images": 0},
     r"num_validation_images: must be an integer >= 1 when validation_prompts are given, got 0"),
    ({"validation_guidance_scale": -1.0}, r"validation_guidance_scale: must be a number >= 0, got -1.0"),
])
def test_bad_validation_fields(make_config, fields, expected):
    with pytest.raises(ValueError, match=expected):
        make_config(**fields).validate()


def test_steps_are_one_increasing_axis():
    """Training steps, DSC iterations and the next task never share or reverse a step number (wandb drops those)."""
    from dcfast.training.monitor import StepAxis

    axis = StepAxis(train_steps=5, consolidation_steps=3)
    steps = [s for n in (1, 2, 3) for s in [axis.train_step(n, k) for k in range(1, 6)]
             + [axis.consolidation_step(n, m) for m in range(1, 4)]]
    assert steps == list(range(1, 25)) and not math.isnan(sum(steps))
