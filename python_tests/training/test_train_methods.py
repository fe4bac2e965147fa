"""Every method trains 2 tasks end to end; outputs load into StableDiffusionPipeline and generate."""
import json

import pytest
import torch
from safetensors import safe_open

import dcfast
from dcfast.training.methods import METHODS
from dcfast.io.runs import Run, load_pipeline, load_tensors, task_dir
from dcfast.models.loading import load_components
from dcfast.training.config import TrainConfig
from dcfast.training.tokens import class_word_embedding


@pytest.mark.parametrize("method", list(METHODS))
def test_two_tasks_end_to_end(make_config, method):
    config = make_config(method)
    result = dcfast.train(config)
    assert [m["task"] for m in result.metrics] == [1, 2]
    for i, folder in enumerate(result.task_dirs, start=1):
        names = {p.name for p in folder.iterdir()}
        assert {"pytorch_lora_weights.safetensors", "learned_embeds.safetensors", "fisher.safetensors",
                "trainer_state.safetensors", "config.json", "metrics.json"} <= names
        assert not [n for n in names if n.startswith(".")], "temporary files left behind"
        assert json.loads((folder / "config.json").read_text())["method"] == method
        assert list(load_tensors(folder / "learned_embeds.safetensors")) == [f"<v{i}>"]
    with safe_open(str(result.task_dirs[1] / "pytorch_lora_weights.safetensors"), "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert all(k.startswith("unet.") and ".default." not in k for k in keys)
    assert json.loads(metadata["lora_adapter_metadata"])["unet.r"] == (2 * config.rank if method == "c-lora" else config.rank)
    has_fisher = method in ("ewc", "ewc-dc", "dsc+ewc-dc")
    assert bool(load_tensors(result.task_dirs[1] / "fisher.safetensors")) == has_fisher
    uses_dc = method in ("ewc-dc", "dsc", "dsc+ewc-dc")  # the task's tau ("auto" by default) is recorded
    for folder in result.task_dirs:
        recorded = json.loads((folder / "metrics.json").read_text())
        assert ("temperature" in recorded) == uses_dc and recorded.get("temperature", 1.0) > 0

    run = Run(config.output_dir)
    tasks = run.tasks()
    assert [(t.token, t.prompt, t.pretrained_concept_prompt) for t in tasks] == [
        ("<v1>", "a photo of <v1> dog", "a photo of a dog"), ("<v2>", "a photo of <v2> mug", "a photo of a mug")]
    assert run.finished_tasks() == [1, 2] and run.metrics(2)["task"] == 2
    assert TrainConfig.from_dict(run.config()) == config  # run.json's config builds the run's config back
    pipe = load_pipeline(config.output_dir, 2)
    assert pipe.tokenizer.tokenize(tasks[0].prompt)[3] == "<v1>"
    # The pipeline's U-Net is the trained one: same noise prediction as the trainer's U-Net.
    unet = result.method.models.unet
    x, t, cond = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert torch.allclose(pipe.unet(x, t, cond).sample, unet(x, t, cond).sample, atol=1e-5)
        embeds = pipe.text_encoder.get_input_embeddings().weight
        ours = result.method.models.text_encoder.get_input_embeddings().weight
        for task in tasks:
            assert torch.equal(embeds[pipe.tokenizer.convert_tokens_to_ids(task.token)],
                               ours[result.method.models.tokenizer.convert_tokens_to_ids(task.token)])
    image = pipe(tasks[1].prompt, num_inference_steps=1, height=16, width=16, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (16, 16, 3)


def test_metrics_record_how_far_each_task_moved_the_lora_and_its_token(make_config):
    """||delta LoRA|| of task 2 is the distance between the LoRA files of states 1 and 2; ||delta token|| is the
    distance of each learned token from its class word's embedding, where it started."""
    config = make_config("lora", max_train_steps=3)
    result = dcfast.train(config)
    states = [load_tensors(folder / "pytorch_lora_weights.safetensors") for folder in result.task_dirs]
    moved = sum(float((states[1][k].double() - states[0][k].double()).pow(2).sum()) for k in states[0]) ** 0.5
    run = Run(config.output_dir)
    assert run.metrics(2)["lora_change"] == pytest.approx(moved, rel=1e-6) and run.metrics(1)["lora_change"] > 0
    base = load_components(config.pretrained_model_name_or_path)
    for task in run.tasks():
        start = class_word_embedding(base.tokenizer, base.text_encoder, task.class_word).double().view(-1)
        learned = load_tensors(task_dir(config.output_dir, task.index) / "learned_embeds.safetensors")[task.token]
        assert run.metrics(task.index)["token_change"] == pytest.approx((learned.double() - start).norm().item(), rel=1e-6)


def test_token_only_its_task_and_other_rows_fixed(make_config):
    config = make_config("lora")
    table_before = None

    def grab(task, step, models):
        nonlocal table_before
        if task == 2 and step == 1:
            table_before = models.text_encoder.get_input_embeddings().weight.detach().clone()

    result = dcfast.train(config, step_callback=grab)
    table_after = result.method.models.text_encoder.get_input_embeddings().weight
    v2 = result.method.models.tokenizer.convert_tokens_to_ids("<v2>")
    rows = torch.arange(table_after.shape[0]) != v2
    assert torch.equal(table_after[rows], table_before[rows])  # <v1> and the vocabulary untouched in task 2
    assert not torch.equal(table_after[v2], table_before[v2])


def test_missing_or_corrupt_outputs_are_named(make_config):
    config = make_config("lora", words=("dog",), max_train_steps=1)
    dcfast.train(config)
    lora = task_dir(config.output_dir, 1) / "pytorch_lora_weights.safetensors"
    lora.write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="corrupt run file .*pytorch_lora_weights.safetensors"):
        load_pipeline(config.output_dir, 1)
    lora.unlink()
    with pytest.raises(FileNotFoundError, match="missing run file .*pytorch_lora_weights.safetensors"):
        load_pipeline(config.output_dir, 1)
    (task_dir(config.output_dir, 1) / "metrics.json").unlink()
    with pytest.raises(FileNotFoundError, match="task 1 .* is not finished"):
        load_pipeline(config.output_dir, 1)
    with pytest.raises(FileNotFoundError, match="missing run file .*run.json"):
        Run(config.output_dir + "-other").tasks()


def test_finished_run_is_not_silently_overwritten(make_config):
    config = make_config("lora", words=("dog",), max_train_steps=1)
    dcfast.train(config)
    with pytest.raises(ValueError, match="already holds finished tasks; pass --resume_from_checkpoint latest"):
        dcfast.train(config)


def test_eval_every_task_writes_each_state_column(make_config):
    config = make_config("lora", eval_every_task=True, eval_num_images=2)
    result = dcfast.train(config)
    for index, folder in enumerate(result.task_dirs, start=1):
        column = json.loads((folder / "eval.json").read_text())
        assert column["task_index"] == index
        assert len(column["accuracy"]) == index and len(column["mmd"]) == index  # every seen concept
        assert all(0.0 <= a <= 1.0 for a in column["accuracy"])


def test_progress_false_draws_no_bars(make_config, capfd, tmp_path):
    """dcfast.train(progress=False): no step, Fisher or DSC bar (benchmark workers would interleave them); the
    default draws them."""
    ours = ("task 1/2 (", "Fisher (", "DSC distillation")  # the bars' labels (model loading has its own bars)
    dcfast.train(make_config("dsc+ewc-dc", max_train_steps=2, dsc_iterations=2), progress=False)
    assert not [label for label in ours if label in capfd.readouterr().err]
    dcfast.train(make_config("dsc+ewc-dc", max_train_steps=2, dsc_iterations=2, output_dir=str(tmp_path / "shown")))
    shown = capfd.readouterr().err
    assert all(label in shown for label in ours), shown[-600:]
