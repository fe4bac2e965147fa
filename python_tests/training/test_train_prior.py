"""Prior preservation (TrainConfig.with_prior_preservation): the base model's class images, sampled once and kept for
a resume; their loss term against the formula with the same draws; the settings' errors."""
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from dcfast.io.runs import load_tensors, read_json, task_dir
from dcfast.models.tiny import tiny_scheduler, tiny_unet
from dcfast.training.prior import PRIOR_FILE, PriorImages
from dcfast.training.trainer import train

from test_train_resume import Killed, _kill_at


class _Models:
    """What PriorImages reads of Models: the U-Net, the scheduler and a condition per prompt."""

    def __init__(self, unet, conditions):
        self.unet, self.noise_scheduler, self.text_encoder_2, self.conditions = unet, tiny_scheduler(), None, conditions

    def encode(self, prompts):
        return torch.stack([self.conditions[p] for p in prompts])


def test_prior_loss_is_the_denoising_loss_of_drawn_class_images_under_their_own_prompts():
    torch.manual_seed(0)
    unet = tiny_unet(sample_size=8)
    conditions = {"a photo of a dog": torch.randn(8, 32), "a photo of a mug": torch.randn(8, 32)}
    images = PriorImages(torch.randn(6, 4, 8, 8), ["a photo of a dog"] * 3 + ["a photo of a mug"] * 3)
    rows = torch.tensor([0, 1, 2, 3, 4, 5])
    with torch.no_grad():
        models = _Models(unet, conditions)
        got = images.loss(models, images.encode(models), rows, 4, torch.Generator().manual_seed(3), 0.0, 16)
        generator = torch.Generator().manual_seed(3)  # the same draws, in the same order, written out
        picked = rows[torch.randint(6, (4,), generator=generator)]
        t = torch.randint(0, 1000, (4,), generator=generator)
        eps = torch.randn((4, 4, 8, 8), generator=generator)
        x0 = images.latents[picked]
        a = tiny_scheduler().alphas_cumprod[t].view(-1, 1, 1, 1)
        cond = torch.stack([conditions[images.prompts[i]] for i in picked.tolist()])
        pred = unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, encoder_hidden_states=cond).sample
        expected = F.mse_loss(pred, eps)
    assert torch.allclose(got, expected, rtol=1e-5)
    assert {images.prompts[i] for i in picked.tolist()} == set(conditions)  # both prompts drawn: per-image conditions


def test_task_n_learns_beside_the_class_images_of_tasks_one_to_n():
    from pathlib import Path

    from dcfast.io.runs import Task

    plan = [Task(i, f"<v{i}>", w, f"a photo of <v{i}> {w}", f"a photo of a {w}", Path("x"))
            for i, w in enumerate(("dog", "mug", "dog"), start=1)]
    images = PriorImages(torch.zeros(4, 1, 2, 2), ["a photo of a dog"] * 2 + ["a photo of a mug"] * 2)
    assert images.rows_for(plan, 1).tolist() == [0, 1]
    assert images.rows_for(plan, 2).tolist() == [0, 1, 2, 3]


def test_a_run_samples_the_class_images_once_and_learns_them(make_config, tmp_path):
    config = make_config("lora", output_dir=str(tmp_path / "prior"), with_prior_preservation=True, num_class_images=3)
    train(config)
    path = tmp_path / "prior" / PRIOR_FILE
    stored = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"class.0": "a photo of a dog", "class.1": "a photo of a mug"}
    assert [stored[f"class.{i}"].shape[0] for i in range(2)] == [3, 3]
    assert not torch.equal(stored["class.0"], stored["class.1"])
    parts = read_json(task_dir(config.output_dir, 2) / "losses.json")["train"]
    assert len(parts["prior"]) == config.max_train_steps and all(v > 0 for v in parts["prior"])

    plain = make_config("lora", output_dir=str(tmp_path / "plain"))
    train(plain)
    assert not (tmp_path / "plain" / PRIOR_FILE).exists()
    a = load_tensors(task_dir(config.output_dir, 2) / "pytorch_lora_weights.safetensors")
    b = load_tensors(task_dir(plain.output_dir, 2) / "pytorch_lora_weights.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_run_reads_the_class_images_back_and_refuses_without_them(make_config, tmp_path):
    fields = dict(with_prior_preservation=True, num_class_images=2, max_train_steps=4, checkpointing_steps=2)
    straight = make_config("lora", output_dir=str(tmp_path / "straight"), **fields)
    train(straight)
    killed = make_config("lora", output_dir=str(tmp_path / "killed"), **fields)
    with pytest.raises(Killed):
        train(killed, step_callback=_kill_at(2, 3))
    train(killed.override(resume_from_checkpoint="latest"))
    name = "pytorch_lora_weights.safetensors"
    a, b = load_tensors(task_dir(straight.output_dir, 2) / name), load_tensors(task_dir(killed.output_dir, 2) / name)
    assert all(torch.equal(a[k], b[k]) for k in a)

    lost = make_config("lora", output_dir=str(tmp_path / "lost"), **fields)
    with pytest.raises(Killed):
        train(lost, step_callback=_kill_at(2, 3))
    (tmp_path / "lost" / PRIOR_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="with_prior_preservation: .* is missing, but 1 task"):
        train(lost.override(resume_from_checkpoint="latest"))


def test_class_images_of_other_prompts_are_refused(make_config, tmp_path):
    first = make_config("lora", output_dir=str(tmp_path / "run"), with_prior_preservation=True, num_class_images=2,
                        max_train_steps=1)
    with pytest.raises(Killed):
        train(first, step_callback=_kill_at(1, 1))
    other = make_config("lora", words=("cat", "mug"), output_dir=str(tmp_path / "run"), with_prior_preservation=True,
                        num_class_images=2, max_train_steps=1)
    with pytest.raises(ValueError, match="not of this run's class prompts"):
        train(other)


def test_prior_preservation_is_refused_for_a_method_that_trains_no_unet_weight(make_config):
    with pytest.raises(ValueError, match="with_prior_preservation: method 'ti' trains no U-Net weight"):
        make_config("ti", with_prior_preservation=True).validate()
