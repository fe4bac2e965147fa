"""The two controls every world table carries, textual inversion (`ti`) and joint training (`joint`), and the
Custom Diffusion baseline (`custom-diffusion`)."""
import json

import pytest
import torch

import dcfast
from dcfast.io.runs import Run, load_tensors, task_dir
from dcfast.models.loading import load_components
from dcfast.training.adapters import add_lora, lora_state


def test_ti_changes_no_unet_or_lora_weight_and_learns_each_token(make_config):
    config = make_config("ti", max_train_steps=3)
    initial = load_components(config.pretrained_model_name_or_path)
    add_lora(initial.unet, config.rank, config.resolved_lora_alpha(), config.target_modules, config.seed)
    before = {k: v.clone() for k, v in initial.unet.state_dict().items()}
    tokens_at_start = {}

    def grab(task, step, models):
        if step == 1:
            tokens_at_start[task] = models.token.param.detach().clone()

    result = dcfast.train(config, step_callback=grab)
    after = result.method.models.unet.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "ti moved a U-Net or LoRA weight"
    assert all(torch.count_nonzero(v) == 0 for k, v in lora_state(result.method.models.unet).items() if "lora_B" in k)
    saved = load_tensors(task_dir(config.output_dir, 2) / "pytorch_lora_weights.safetensors")
    assert saved and all(torch.count_nonzero(v) == 0 for k, v in saved.items() if "lora_B" in k)
    for i in (1, 2):  # each token moved in its own task, the LoRA in none, and metrics.json says so
        learned = load_tensors(task_dir(config.output_dir, i) / "learned_embeds.safetensors")[f"<v{i}>"]
        assert not torch.equal(learned, tokens_at_start[i][0])
        recorded = Run(config.output_dir).metrics(i)
        assert recorded["lora_change"] == 0.0 and recorded["token_change"] > 0


def test_joint_learns_every_token_at_once_and_writes_every_task(make_config):
    config = make_config("joint", words=("dog", "mug", "cat"), max_train_steps=2)
    steps, seen = [], {}

    def grab(task, step, models):
        steps.append((task, step))
        embeds = models.text_encoder.get_input_embeddings()
        ids = torch.tensor([models.tokenizer.convert_tokens_to_ids(f"<v{i}>") for i in (1, 2, 3)])
        with torch.no_grad():  # the live tokens are spliced in by their hooks: read them through the embedding
            seen[step] = embeds(ids).detach().clone()

    result = dcfast.train(config, step_callback=grab)
    assert steps == [(3, s) for s in range(1, 7)]  # one phase, 3 tasks x 2 steps, all tokens live together
    assert all(not torch.equal(seen[1][i], seen[6][i]) for i in range(3)), "a token did not learn"
    assert [m["task"] for m in result.metrics] == [1, 2, 3]
    assert Run(config.output_dir).finished_tasks() == [1, 2, 3]
    loras = [load_tensors(task_dir(config.output_dir, i) / "pytorch_lora_weights.safetensors") for i in (1, 2, 3)]
    assert all(torch.equal(loras[0][k], other[k]) for other in loras[1:] for k in loras[0])  # one state
    for i in (1, 2, 3):
        metrics = json.loads((task_dir(config.output_dir, i) / "metrics.json").read_text())
        assert metrics["trained_jointly_with"] == [1, 2, 3] and metrics["steps"] == 6
        token = load_tensors(task_dir(config.output_dir, i) / "learned_embeds.safetensors")[f"<v{i}>"]
        assert torch.equal(token, seen[6][i - 1])


@pytest.mark.parametrize("start", ["class_word", "random"])
def test_joint_tokens_start_where_joint_token_init_says(make_config, tmp_path, start):
    """Two tasks of one class word: "class_word" starts both tokens at its embedding (equal), "random" apart."""
    from dcfast.training.tokens import class_word_embedding

    config = make_config("joint", words=("dog", "dog"), max_train_steps=1, joint_token_init=start,
                         token_learning_rate=1e-6, output_dir=str(tmp_path / start))
    base = load_components(config.pretrained_model_name_or_path)
    at_start = {}

    def grab(task, step, models):  # at step 1 the tokens moved by one Adam step: <= 1e-6 per entry
        embeds = models.text_encoder.get_input_embeddings()
        ids = torch.tensor([models.tokenizer.convert_tokens_to_ids(f"<v{i}>") for i in (1, 2)])
        with torch.no_grad():
            at_start.update(enumerate(embeds(ids).detach().clone(), 1))

    dcfast.train(config, step_callback=grab)
    word = class_word_embedding(base.tokenizer, base.text_encoder, "dog").view(-1)
    one_step = 2e-6 * word.numel() ** 0.5  # bound on what one Adam step moves a token
    distances = [(at_start[i] - word).norm().item() for i in (1, 2)]
    if start == "class_word":
        assert max(distances) <= one_step and (at_start[1] - at_start[2]).norm() <= 2 * one_step
    else:
        assert min(distances) > 1000 * one_step and (at_start[1] - at_start[2]).norm() > 1000 * one_step


def test_joint_loss_conditions_each_image_on_its_own_prompt(make_config):
    """The joint loss of a mixed batch equals the per-prompt losses of a naive loop on the same (t, eps)."""
    from dcfast.engine.targets import training_target
    from dcfast.training.methods import Models, TaskData, get_method

    config = make_config("joint")
    parts = load_components(config.pretrained_model_name_or_path)
    models = Models(parts.unet, parts.text_encoder, parts.tokenizer, parts.noise_scheduler, accelerator=None)
    method = get_method("joint")(config, models)
    x0 = torch.randn(3, 4, 8, 8)
    prompts = ["a photo of a dog", "a photo of a mug", "a photo of a dog"]
    method.begin_task(TaskData(index=2, latents=x0, prompt=prompts[1], pretrained_concept_prompt="",
                               generator=torch.Generator().manual_seed(5), image_prompts=prompts))
    with torch.no_grad():
        loss, _ = method.loss(x0, prompts)
    generator = torch.Generator().manual_seed(5)
    t = torch.randint(0, parts.noise_scheduler.config.num_train_timesteps, (3,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    with torch.no_grad():
        per_image = []
        for b, prompt in enumerate(prompts):
            cond = models.encode([prompt]).hidden
            x_t = parts.noise_scheduler.add_noise(x0[b:b + 1], noise[b:b + 1], t[b:b + 1])
            pred = parts.unet(x_t, t[b:b + 1], encoder_hidden_states=cond).sample
            per_image.append((pred - training_target(parts.noise_scheduler, x0[b:b + 1], noise[b:b + 1], t[b:b + 1])).pow(2).mean())
    expected = torch.stack(per_image).mean()
    scale = max(float(p.abs()) for p in per_image)
    assert abs(float(loss) - float(expected)) <= 1e-5 * scale


def test_custom_diffusion_changes_only_cross_attention_kv_and_the_token(make_config):
    from dcfast.training.adapters import is_cross_attention_kv

    config = make_config("custom-diffusion", max_train_steps=3)
    initial = load_components(config.pretrained_model_name_or_path)
    add_lora(initial.unet, config.rank, config.resolved_lora_alpha(), config.target_modules, config.seed)
    before = {k: v.clone() for k, v in initial.unet.state_dict().items()}
    result = dcfast.train(config)
    after = result.method.models.unet.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(is_cross_attention_kv(k) and ".lora_" in k for k in moved), sorted(moved)[:4]
    assert any(".attn2.to_k." in k for k in moved) and any(".attn2.to_v." in k for k in moved)
    assert not any(".attn1." in k for k in moved)  # self-attention, also under the LoRA, stays
    for i in (1, 2):
        assert Run(config.output_dir).metrics(i)["token_change"] > 0


def test_custom_diffusion_needs_the_lora_on_key_and_value(make_config):
    with pytest.raises(ValueError, match="custom-diffusion trains the cross-attention to_k and to_v"):
        make_config("custom-diffusion", target_modules=["to_q", "to_out.0"]).validate()
