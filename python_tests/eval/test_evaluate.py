"""dcfast.evaluate on fake run directories: accuracy beats chance, forgetting shows in BwT, clear errors."""
import math
import os

import pytest

from dcfast.eval import evaluation
from dcfast.io import runs as real_runs
from dcfast.io.runs import Run
from dcfast.eval.evaluation import EvalConfig, candidate_prompts, evaluate, evaluate_task, load_image_folder

import toy_runs  # python_tests/toy_runs.py, on sys.path through conftest.py

# guidance 1: the toy denoiser is exact, and guidance would push its samples past the colour range
FAST = EvalConfig(num_images=4, num_inference_steps=4, guidance_scale=1.0, stages=((4, 2), (8, 1)), progress=False)


pytestmark = pytest.mark.usefixtures("fake_runs")


def test_accuracy_matrix_beats_chance(tmp_path):
    run = toy_runs.make_run(str(tmp_path), colours=(toy_runs.RED, toy_runs.BLUE))
    result = evaluate(run, num_images=4, config=FAST)
    acc = result.accuracy
    assert math.isnan(acc[1, 0]) and math.isnan(result.mmd[1, 0])  # concept 2 unseen in state 1
    # state 1: candidates <v1>, c_0 (chance 1/2); state 2: <v1>, <v2>, c_0 (chance 1/3)
    assert acc[0, 0] > 1 / 2 and acc[:, 1].mean() > 1 / 3
    assert acc[~acc.isnan()].mean() >= 0.9
    assert result.method == "lora" and result.summary["train_seconds"] == pytest.approx(4.5)  # 1.5 + 3.0
    assert result.features.startswith("dcfast-randconv")
    assert set(result.samples) == {(1, 1), (1, 2), (2, 2)}


def test_forgetting_shows_in_bwt(tmp_path):
    stable = evaluate(toy_runs.make_run(str(tmp_path / "a")), num_images=4, config=FAST)
    forgetful = evaluate(toy_runs.make_run(str(tmp_path / "b"), forget=0.6), num_images=4, config=FAST)
    # Same model for concept 1 in both states: BwT is zero up to float32 rounding of the features, which
    # varies with the CPU's SIMD paths (seen: 8e-10, 1.8e-9; MMD^2 ~1e-4 is a small difference of kernel
    # terms ~1, so that rounding is ~1e-7 at worst). Bounds relative to the forgetting signal (~0.2) and
    # to the stable run's own MMD values.
    scale = max(abs(v) for v in stable.mmd.flatten().tolist() if not math.isnan(v))
    assert forgetful.summary["bwt_mmd"] > 100 * scale
    assert abs(stable.summary["bwt_mmd"]) <= 1e-5 * forgetful.summary["bwt_mmd"], stable.summary["bwt_mmd"]
    assert forgetful.mmd[0, 1] > forgetful.mmd[0, 0]


def test_evaluate_task_one_column(tmp_path):
    run = toy_runs.make_run(str(tmp_path), colours=(toy_runs.RED, toy_runs.BLUE, toy_runs.GREEN))
    column = evaluate_task(run, 2, config=FAST)
    assert len(column.accuracy) == len(column.mmd) == 2 and column.i2i is None
    assert set(column.samples) == {1, 2}
    assert "samples" not in column.to_dict()
    tasks = Run(run).tasks()
    assert candidate_prompts(tasks, 2) == ["a photo of <v1> dog", "a photo of <v2> dog", "a photo of a dog"]


def test_without_held_out_images_uses_train_split(tmp_path):
    result = evaluate(toy_runs.make_run(str(tmp_path), held_out=False), num_images=4, config=FAST)
    assert [t["eval_split"] for t in result.tasks] == ["train", "train"]


def test_real_tiny_unet_with_vae_runs(tmp_path):
    run = toy_runs.make_run(str(tmp_path), model="tiny")
    result = evaluate(run, num_images=2, config=EvalConfig(num_images=2, num_inference_steps=2, stages=((2, 1),),
                                                           max_eval_images=2, progress=False))
    assert result.samples[(1, 2)].shape == (2, 3, 16, 16)  # 8x8 latents through the VAE
    assert not result.mmd[0].isnan().any() and result.seconds_per_image[0, 0] > 0


def test_missing_task_output_names_file(tmp_path):
    run = toy_runs.make_run(str(tmp_path))
    lora = os.path.join(run, "task_2", "pytorch_lora_weights.safetensors")
    os.remove(lora)
    with pytest.raises(FileNotFoundError, match="missing run file .*task_2/pytorch_lora_weights.safetensors"):
        evaluate(run, num_images=4, config=FAST)


def test_corrupt_task_output_names_file(tmp_path):
    run = toy_runs.make_run(str(tmp_path))
    with open(os.path.join(run, "task_1", "pytorch_lora_weights.safetensors"), "wb") as f:
        f.write(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt run file .*task_1/pytorch_lora_weights.safetensors"):
        evaluate(run, num_images=4, config=FAST)


def test_corrupt_or_missing_eval_images_name_the_file(tmp_path):
    run = toy_runs.make_run(str(tmp_path))
    eval_dir = os.path.join(run, "data", "concept_2", "eval")
    with open(os.path.join(eval_dir, "01.png"), "wb") as f:
        f.write(b"\x89PNG truncated")
    with pytest.raises(ValueError, match="concept_2/eval/01.png"):
        evaluate(run, num_images=4, config=FAST)
    with pytest.raises(ValueError, match="nowhere.* does not exist"):
        load_image_folder(str(tmp_path / "nowhere"), 8)
    with pytest.raises(ValueError, match="needs at least 2"):
        load_image_folder(eval_dir, 8, limit=1)


def test_config_errors():
    with pytest.raises(ValueError, match="num_images must be >= 2"):
        EvalConfig(num_images=1)
    with pytest.raises(ValueError, match="must not shrink"):
        EvalConfig(stages=((8, 2), (4, 1)))


def test_unfinished_tasks(tmp_path):
    run = toy_runs.make_run(str(tmp_path / "a"), colours=(toy_runs.RED, toy_runs.BLUE, toy_runs.GREEN))
    os.remove(os.path.join(run, "task_3", "metrics.json"))  # task 3 still training
    with pytest.warns(UserWarning, match="evaluating the 2 finished tasks of 3"):
        result = evaluate(run, num_images=4, config=FAST)
    assert result.accuracy.shape == (2, 2)
    damaged = toy_runs.make_run(str(tmp_path / "b"))
    os.remove(os.path.join(damaged, "task_1", "metrics.json"))
    with pytest.raises(FileNotFoundError, match="task_1/metrics.json"):
        evaluate(damaged, num_images=4, config=FAST)


def test_real_trained_run(tmp_path, monkeypatch):
    """A 2-task run of the real trainer (2 steps per task), its states loaded by the real load_pipeline."""
    import dcfast
    from dcfast.training.config import TrainConfig
    from dcfast.models.tiny import tiny

    monkeypatch.setattr(evaluation, "load_pipeline", real_runs.load_pipeline)
    tiny(seed=0).save_pretrained(tmp_path / "model")
    tasks = []
    for j, colour in enumerate((toy_runs.RED, toy_runs.BLUE), 1):
        folder = tmp_path / f"concept_{j}"
        toy_runs.write_concept_folder(str(folder / "train"), colour, 3, seed=j)
        toy_runs.write_concept_folder(str(folder / "eval"), colour, 2, seed=10 + j)
        tasks.append({"images": str(folder / "train"), "eval_images": str(folder / "eval"), "class_word": "dog"})
    config = TrainConfig.from_dict(dict(
        pretrained_model_name_or_path=str(tmp_path / "model"), output_dir=str(tmp_path / "run"), method="lora",
        tasks=tasks, max_train_steps=2, train_batch_size=2, checkpointing_steps=100, learning_rate=1e-3))
    dcfast.train(config)
    result = dcfast.evaluate(str(tmp_path / "run"), num_images=2, config=EvalConfig(
        num_images=2, num_inference_steps=2, stages=((2, 1),), max_eval_images=2, progress=False))
    assert result.method == "lora" and result.summary["train_seconds"] > 0
    assert not result.accuracy[0].isnan().any() and not result.mmd[0].isnan().any()
    assert [t["pretrained_concept_prompt"] for t in result.tasks] == ["a photo of a dog"] * 2
    lora = tmp_path / "run" / "task_2" / "pytorch_lora_weights.safetensors"
    lora.write_bytes(b"\x00" * 7)
    with pytest.raises(ValueError, match="corrupt run file .*task_2/pytorch_lora_weights.safetensors"):
        evaluate_task(str(tmp_path / "run"), 2, config=FAST)


def test_fidelity_only_refuses_a_run_that_is_not_of_the_world(tmp_path):
    run = toy_runs.make_run(str(tmp_path))
    with pytest.raises(ValueError, match="fidelity_only needs a tiny-world run"):
        evaluate(run, num_images=4, config=EvalConfig(**{**FAST.__dict__, "fidelity_only": True}))
