"""Resume after a kill mid-task equals the uninterrupted run; a non-finite loss stops and keeps the checkpoint."""
import pytest
import torch

from dcfast.training.checkpoint import latest_checkpoint
from dcfast.io.runs import Run, load_tensors, read_json, task_dir
from dcfast.training.trainer import train


class Killed(Exception):
    pass


def _kill_at(task_index, step):
    def callback(task, s, models):
        if (task, s) == (task_index, step):
            raise Killed
    return callback


@pytest.mark.parametrize("method", ["ewc-dc", "c-lora", "dsc"])
def test_resume_after_kill_equals_uninterrupted(make_config, tmp_path, method):
    straight = make_config(method, output_dir=str(tmp_path / "straight"), max_train_steps=4, checkpointing_steps=2)
    train(straight)

    killed = make_config(method, output_dir=str(tmp_path / "killed"), max_train_steps=4, checkpointing_steps=2)
    with pytest.raises(Killed):
        train(killed, step_callback=_kill_at(2, 3))  # task 1 done, task 2 checkpointed at step 2
    assert Run(killed.output_dir).finished_tasks() == [1]
    assert latest_checkpoint(killed.output_dir).name == "task_2-step_2"
    redone = []
    result = train(killed.override(resume_from_checkpoint="latest"), step_callback=lambda t, s, m: redone.append((t, s)))
    assert redone == [(2, 3), (2, 4)]  # task 1 not redone; task 2 continues after its checkpoint

    for name in ("pytorch_lora_weights.safetensors", "fisher.safetensors", "learned_embeds.safetensors",
                 "trainer_state.safetensors"):
        a, b = load_tensors(task_dir(straight.output_dir, 2) / name), load_tensors(task_dir(killed.output_dir, 2) / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # the per-step losses and their parts survive the kill (the checkpoint carries them)
    assert read_json(task_dir(straight.output_dir, 2) / "losses.json") == read_json(task_dir(killed.output_dir, 2) / "losses.json")
    metrics = read_json(task_dir(straight.output_dir, 2) / "metrics.json")
    assert metrics["final_loss"] == result.metrics[1]["final_loss"]
    assert latest_checkpoint(killed.output_dir) is None  # checkpoints removed once the task is written


def test_resume_rejects_a_changed_config(make_config):
    config = make_config("lora", words=("dog",), max_train_steps=1)
    train(config)
    with pytest.raises(ValueError, match="trained with different method"):
        train(config.override(method="ewc", resume_from_checkpoint="latest"))


def test_resume_rejects_a_base_model_replaced_at_the_same_path(make_config, model_dir, tmp_path):
    import shutil

    from dcfast.models.tiny import tiny

    base = tmp_path / "base"
    shutil.copytree(model_dir, base)
    config = make_config("lora", words=("dog", "mug"), max_train_steps=1, pretrained_model_name_or_path=str(base))
    with pytest.raises(Killed):
        train(config, step_callback=_kill_at(2, 1))
    trained_on = read_json(f"{config.output_dir}/run.json")["base_model_fingerprint"]
    assert trained_on.startswith("sha256:")
    shutil.rmtree(base)
    tiny(seed=1).save_pretrained(base)  # other weights, same path and layout
    with pytest.raises(ValueError, match="other weights than the run .* was trained on .*original base model"):
        train(config.override(resume_from_checkpoint="latest"))
    assert Run(config.output_dir).finished_tasks() == [1]  # nothing of the run was touched
    assert read_json(f"{config.output_dir}/run.json")["base_model_fingerprint"] == trained_on


def test_non_finite_loss_stops_and_keeps_last_checkpoint(make_config):
    config = make_config("lora", words=("dog",), max_train_steps=6, checkpointing_steps=1,
                         learning_rate=1e30, token_learning_rate=1e30)
    with pytest.raises(FloatingPointError, match=r"loss became (nan|inf) at task 1 step \d.*Last good checkpoint: .*task_1-step_\d"):
        train(config)
    assert Run(config.output_dir).finished_tasks() == []
    assert latest_checkpoint(config.output_dir) is not None
