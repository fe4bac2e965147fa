"""The methods' losses against hand computations: EWC-DC's DC term, penalty and F_DC; DSC's teachers;
C-LoRA's penalty."""
import pytest
import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler, UNet2DConditionModel

from dcfast.adapters import add_lora, lora_layers
from dcfast.config import TrainConfig
from dcfast.methods import Models, TaskData, get_method
from dcfast.models import tiny
from dcfast.objectives import fisher_pairs
from dcfast.runs import load_tensors, task_dir
from dcfast.trainer import train


def _method(name, **fields):
    """A method on the tiny model with a random (non-zero) LoRA, in task 2 of a 'dog' run."""
    pipe = tiny(seed=0)
    add_lora(pipe.unet, 2, 2, ["to_q", "to_k", "to_v", "to_out.0"], seed=0)
    torch.manual_seed(1)
    pipe.unet.requires_grad_(False)
    params = {n: p for n, p in pipe.unet.named_parameters() if ".lora_" in n}
    with torch.no_grad():
        for p in params.values():
            p.normal_(0, 0.2).requires_grad_(True)
    models = Models(pipe.unet, pipe.text_encoder.requires_grad_(False), pipe.tokenizer,
                    DDPMScheduler.from_config(pipe.scheduler.config), Accelerator())
    config = TrainConfig(method=name, temperature=0.7, num_dc_concepts=3, fisher_num_timesteps=2, **fields)
    method = get_method(name)(config, models)
    task = TaskData(index=2, latents=torch.randn(3, 4, 8, 8), prompt="a photo of my dog", class_prompt="a photo of a dog",
                    past_prompts=["a photo of red cat"], generator=torch.Generator().manual_seed(2),
                    shared_generator=torch.Generator().manual_seed(3), seed=4)
    method.begin_task(task)
    return method, params, task


def _naive_log_probs(models, x0, conds, timesteps, noise, temperature):
    """One U-Net call per (image, concept, timestep): log p(c_k | x0[b]) (B, K)."""
    abar = models.noise_scheduler.alphas_cumprod
    rows = []
    for b in range(x0.shape[0]):
        logits = []
        for k in range(conds.shape[0]):
            errs = []
            for j in range(timesteps.shape[1]):
                a = abar[timesteps[b, j]]
                x_t = a.sqrt() * x0[b] + (1 - a).sqrt() * noise[b, j]
                pred = models.unet(x_t[None], timesteps[b, j][None], encoder_hidden_states=conds[k][None]).sample[0]
                errs.append((noise[b, j] - pred).pow(2).mean())
            logits.append(-torch.stack(errs).mean() / temperature)
        rows.append(torch.stack(logits))
    return torch.log_softmax(torch.stack(rows), dim=-1)


def test_ewc_dc_term_and_gradient_match_hand_computation():
    method, params, task = _method("ewc-dc")
    models = method.models
    with torch.no_grad():
        conds = models.encode(method.concepts(task, None))
    assert conds.shape[0] == 3  # c_n, c_0 and the one earlier concept
    x0 = task.latents[:2]
    timesteps = torch.tensor([[100, 700], [300, 900]])
    noise = torch.randn(2, 2, 4, 8, 8)
    ours = method.dc_loss(x0, conds, timesteps, noise)
    ours_grads = torch.autograd.grad(ours, list(params.values()))
    log_p = _naive_log_probs(models, x0, conds, timesteps, noise, 0.7)
    hand = (-log_p[:, 0] + log_p[:, 1] + log_p[:, 2]).mean()  # +H(c_n) - H(c_0) - H(c_1)
    hand_grads = torch.autograd.grad(hand, list(params.values()))
    # float32 through two U-Net batchings: tolerances relative to each value's scale. The gradient nets
    # pull and push terms (+H(c_n) - H(c_0) - H(c_1)), so entries far below its largest carry rounding of
    # that size: 1e-3 of the largest (seen: 3.6e-5).
    torch.testing.assert_close(ours, hand, rtol=1e-5, atol=1e-6 * max(1.0, hand.abs().item()))
    for a, b in zip(ours_grads, hand_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3 * b.abs().max().item())


def test_ewc_penalty_value_and_gradient():
    method, params, _ = _method("ewc-dc", ewc_lambda=3.0)
    fisher = {n: torch.rand_like(p) for n, p in params.items()}
    for n, f in fisher.items():
        method.fisher.fisher[n].copy_(f)
    method.anchor = {n: p.detach() + 0.1 * torch.randn_like(p) for n, p in params.items()}
    penalty = method.penalty()
    grads = torch.autograd.grad(penalty, list(params.values()))
    diff = {n: p.detach() - method.anchor[n] for n, p in params.items()}
    torch.testing.assert_close(penalty, 1.5 * sum((fisher[n] * diff[n] ** 2).sum() for n in params))
    for g, n in zip(grads, params):
        torch.testing.assert_close(g, 3.0 * fisher[n] * diff[n])


@pytest.mark.parametrize("name", ["ewc-dc", "ewc"])
def test_fisher_is_per_sample_and_merged_online(name):
    method, params, task = _method(name, gamma=0.5, fisher_batch_size=2)
    models = method.models
    losses = method.fisher_losses(task)
    if name == "ewc-dc":  # the per-sample loss is H(p(.|x0), c_n) over S
        with torch.no_grad():
            conds = models.encode(method.concepts(task, None))
            t, noise = fisher_pairs(models.noise_scheduler, task.latents[:2], [0, 1], 2, task.seed)
            torch.testing.assert_close(losses([0, 1]), -_naive_log_probs(models, task.latents[:2], conds, t, noise, 0.7)[:, 0])
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for m in range(3):  # hand: one backward per image, square, sum
        for n, g in zip(params, torch.autograd.grad(losses([m])[0], list(params.values()))):
            expected[n] += g ** 2
    past = {n: torch.rand_like(p) for n, p in params.items()}
    for n in params:
        method.fisher.fisher[n].copy_(past[n])
    method.end_task(task)  # F <- 0.5 F + F_n, F_n in chunks of 2 images
    for n in params:
        want = 0.5 * past[n] + expected[n]
        torch.testing.assert_close(method.fisher.fisher[n], want, rtol=1e-4, atol=1e-6 * want.abs().max().item())
        assert torch.equal(method.anchor[n], params[n].detach())


def test_dsc_teachers_frozen_and_t2_from_earlier_tasks(make_config):
    config = make_config("dsc", words=("dog", "mug", "cat"), dsc_iterations=4)
    trained = {}

    def capture(task, step, models):
        if step == config.max_train_steps:
            trained[task] = {n: p.detach().clone() for n, p in models.lora().items()}

    result = train(config, step_callback=capture)
    distiller = result.method.distiller
    assert distiller.draws[:4] == [1, 1, 1, 1]  # task 2: only LoRA_1 is earlier
    assert set(distiller.draws[4:]) <= {1, 2} and len(distiller.draws) == 8  # task 3: LoRA_1 or LoRA_2, never LoRA_3
    assert len(distiller.pool) == 3
    for i in (1, 2, 3):  # the pool holds each task's final LoRA, unchanged by later distillation
        saved = load_tensors(task_dir(config.output_dir, i) / "trainer_state.safetensors")
        assert all(torch.equal(distiller.pool[i - 1][n], saved[f"lora.{n}"]) for n in distiller.pool[0])
    teacher1 = distiller.teacher1  # T1 of task 3: the LoRA at the end of task 3's training, untouched
    assert all(torch.equal(teacher1[n], trained[3][n]) and not teacher1[n].requires_grad for n in teacher1)
    assert any(not torch.equal(distiller.pool[2][n], teacher1[n]) for n in teacher1)  # the student moved


def test_clora_penalty_merge_and_export(make_config, model_dir):
    config = make_config("c-lora", clora_lambda=10.0, rank=2)
    result = train(config)
    method = result.method
    task1 = load_tensors(task_dir(config.output_dir, 1) / "trainer_state.safetensors")
    assert len(method.past) == 1 and all(torch.equal(method.past[0][n], task1[f"lora.{n}"]) for n in method.past[0])
    layers = lora_layers(method.models.unet)
    penalty = method.penalty()
    hand = 0.0
    for name, layer in layers.items():
        a1, b1 = task1[f"lora.{name}.lora_A.default.weight"], task1[f"lora.{name}.lora_B.default.weight"]
        w_past = b1 @ a1  # alpha = rank: scaling 1
        hand = hand + (w_past * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight)).pow(2).sum()
    hand = 10.0 * hand
    torch.testing.assert_close(penalty, hand)
    params = [p for n, p in method.models.unet.named_parameters() if ".lora_" in n]
    for a, b in zip(torch.autograd.grad(penalty, params), torch.autograd.grad(hand, params)):
        torch.testing.assert_close(a, b)
    base = dict(UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").named_parameters())
    name, layer = next(iter(layers.items()))
    merged = base[f"{name}.weight"] + task1[f"lora.{name}.lora_B.default.weight"] @ task1[f"lora.{name}.lora_A.default.weight"]
    torch.testing.assert_close(layer.base_layer.weight, merged)
    stacked, rank, alpha = method.export_lora()
    assert (rank, alpha) == (4, 4)
    a, b = stacked[f"{name}.lora_A.default.weight"], stacked[f"{name}.lora_B.default.weight"]
    current = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(b @ a, merged - base[f"{name}.weight"] + current)
