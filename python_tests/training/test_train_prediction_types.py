"""The model's prediction type at config time and through a run: v-prediction trains, "sample" is refused first."""
import json
import math
import shutil

import pytest

from dcfast.models.loading import load_components
from dcfast.training.trainer import train


def _with_prediction(model_dir, tmp_path, kind):
    path = tmp_path / f"model_{kind}"
    shutil.copytree(model_dir, path)
    file = path / "scheduler" / "scheduler_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "prediction_type": kind}))
    return path


def test_sample_prediction_refused_at_validation(make_config, model_dir, tmp_path):
    path = _with_prediction(model_dir, tmp_path, "sample")
    with pytest.raises(ValueError, match=r"pretrained_model_name_or_path: the model's scheduler .* has prediction_type "
                                         r"'sample'; dcfast supports epsilon and v_prediction models only"):
        make_config(pretrained_model_name_or_path=str(path)).validate()


def test_v_prediction_model_trains(make_config, model_dir, tmp_path):
    path = _with_prediction(model_dir, tmp_path, "v_prediction")
    assert load_components(path).noise_scheduler.config.prediction_type == "v_prediction"  # what the losses read
    result = train(make_config("ewc-dc", words=("dog",), pretrained_model_name_or_path=str(path), max_train_steps=1))
    assert math.isfinite(result.metrics[0]["final_loss"]) and result.metrics[0]["fisher_raw_mean"] > 0
