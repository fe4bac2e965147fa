"""C-LoRA with peft scaling alpha/r != 1: the merge, the fresh LoRA of each task, the penalty and the export."""
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

import formulas
from dcfast.training.adapters import lora_layers
from dcfast.io.runs import load_tensors, task_dir
from dcfast.training.trainer import train

RANK, ALPHA = 2, 4  # scaling alpha / r = 2


def test_clora_fresh_lora_per_task_keeps_the_function():
    """Task 2 starts from W + 2 B_1 A_1 with a fresh LoRA (B = 0, new A): the U-Net computes what it did."""
    method, params, task = formulas.toy_method("c-lora", index=1, past=(), rank=RANK, alpha=ALPHA)
    unet = method.models.unet
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([100, 600]), torch.randn(2, 77, 32)
    before = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        out_task1 = unet(x, t, cond).sample
    task.index, task.past_prompts = 2, [task.prompt]
    method.begin_task(task)
    for name, layer in lora_layers(unet).items():
        assert torch.equal(layer.lora_B["default"].weight, torch.zeros_like(layer.lora_B["default"].weight)), name
        assert not torch.equal(layer.lora_A["default"].weight, before[f"{name}.lora_A.default.weight"]), name
    with torch.no_grad():
        out_task2 = unet(x, t, cond).sample
    torch.testing.assert_close(out_task2, out_task1, rtol=1e-5, atol=1e-6 * out_task1.abs().max().item())
    assert method.penalty().item() == 0.0  # B_2 = 0


def test_clora_penalty_merge_and_export(make_config, model_dir):
    config = make_config("c-lora", clora_lambda=10.0, rank=RANK, lora_alpha=ALPHA)
    result = train(config)
    method = result.method
    task1 = load_tensors(task_dir(config.output_dir, 1) / "trainer_state.safetensors")
    assert len(method.past) == 1 and all(torch.equal(method.past[0][n], task1[f"lora.{n}"]) for n in method.past[0])
    layers = lora_layers(method.models.unet)
    penalty = method.penalty()
    hand = 0.0
    for name, layer in layers.items():
        a1, b1 = task1[f"lora.{name}.lora_A.default.weight"], task1[f"lora.{name}.lora_B.default.weight"]
        w_past = 2.0 * b1 @ a1  # scaling alpha / r = 2
        delta = 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        hand = hand + (w_past * delta).pow(2).sum()
    hand = 10.0 * hand
    assert hand.item() > 0
    torch.testing.assert_close(penalty, hand)
    params = [p for n, p in method.models.unet.named_parameters() if ".lora_" in n]
    for a, b in zip(torch.autograd.grad(penalty, params), torch.autograd.grad(hand, params)):
        torch.testing.assert_close(a, b)
    base = dict(UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").named_parameters())
    name, layer = next(iter(layers.items()))
    b1, a1 = task1[f"lora.{name}.lora_B.default.weight"], task1[f"lora.{name}.lora_A.default.weight"]
    merged = base[f"{name}.weight"] + 2.0 * b1 @ a1
    torch.testing.assert_close(layer.base_layer.weight, merged)
    stacked, rank, alpha = method.export_lora()
    assert (rank, alpha) == (2 * RANK, 2 * ALPHA)  # scaling of the stacked LoRA stays 2
    a, b = stacked[f"{name}.lora_A.default.weight"], stacked[f"{name}.lora_B.default.weight"]
    current = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(2.0 * b @ a, merged - base[f"{name}.weight"] + 2.0 * current)


def test_clora_cross_kv_scope_trains_and_merges_the_key_value_projections_only(make_config):
    """clora_scope "cross_kv": every weight outside the cross-attention K/V projections ends as it began, across the
    merge of task 1's LoRA into the base weights; those inside move."""
    from dcfast.models.loading import load_components
    from dcfast.training.adapters import add_lora
    from dcfast.training.adapters import is_cross_attention_kv

    config = make_config("c-lora", max_train_steps=2, clora_scope="cross_kv")
    initial = load_components(config.pretrained_model_name_or_path)
    add_lora(initial.unet, config.rank, config.resolved_lora_alpha(), config.target_modules, config.seed)
    before = initial.unet.state_dict()
    result = train(config)
    after = result.method.models.unet.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k]) and "lora_A" not in k}  # A: fresh per task
    assert moved and all(is_cross_attention_kv(k) for k in moved), sorted(moved)[:4]
    assert any("base_layer" in k for k in moved)  # task 1's K/V LoRA merged into the base weights


def test_clora_token_start_follows_its_setting(make_config):
    """clora_token_init "class_word": the token starts at its class word's embedding (its recorded ||delta token||
    is the distance from there); "random" (the spec's) does not."""
    from dcfast.io.runs import Run
    from dcfast.models.loading import load_components
    from dcfast.training.tokens import class_word_embedding

    base = load_components(make_config("c-lora").pretrained_model_name_or_path)
    for start in ("class_word", "random"):
        config = make_config("c-lora", max_train_steps=2, clora_token_init=start)
        config = make_config("c-lora", max_train_steps=2, clora_token_init=start,
                             output_dir=str(Path(config.output_dir).parent / f"run-{start}"))
        train(config)
        run = Run(config.output_dir)
        task = run.tasks()[0]
        learned = load_tensors(task_dir(config.output_dir, 1) / "learned_embeds.safetensors")[task.token].double()
        from_class_word = (learned - class_word_embedding(base.tokenizer, base.text_encoder, task.class_word)
                           .double().view(-1)).norm().item()
        assert (run.metrics(1)["token_change"] == pytest.approx(from_class_word, rel=1e-6)) is (start == "class_word")
