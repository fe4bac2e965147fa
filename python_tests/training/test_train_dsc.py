"""DSC against docs/design.md's L_DSC written as loops (formulas.py), its first step, its teacher pool, and the
EWC-DC penalty inside DSC+EWC-DC's distillation."""
import json

import pytest
import torch

import formulas
from dcfast.training.adapters import lora_state
from dcfast.io.runs import load_tensors, task_dir
from dcfast.training.trainer import train

PAST = ["a photo of red cat", "a photo of blue mug"]  # c_1, c_2 of the toy task 3


def _random_lora(params, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g) * 0.2 for n, p in params.items()}


def _kl(log_p, log_q):
    """KL(p || q) per image, averaged over images: sum_k p_k (log p_k - log q_k)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


@pytest.mark.parametrize("k, m, prompts, prediction", [
    (4, 0, [formulas.PROMPT, formulas.CLASS_PROMPT, "a photo of red cat", "a photo of blue mug"], "epsilon"),
    (4, 1, [formulas.PROMPT, formulas.CLASS_PROMPT, "a photo of blue mug", "a photo of red cat"], "epsilon"),
    (2, 0, [formulas.PROMPT, "a photo of red cat"], "epsilon"),
    (4, 1, [formulas.PROMPT, formulas.CLASS_PROMPT, "a photo of blue mug", "a photo of red cat"], "v_prediction"),
])
def test_dsc_loss_matches_formula(k, m, prompts, prediction):
    """L_DSC = alpha [KL(p_T1||p_S) + KL(p_T2||p_S)] + beta [||eps_S(c_n) - eps_T1(c_n)||^2 + ||eps_S(c_m) - eps_T2(c_m)||^2].

    v-prediction: the DC errors compare with v, and the noise terms compare the student's v with the teachers'."""
    method, params, task = formulas.toy_method("dsc", index=3, past=PAST, num_dc_concepts=k, dsc_alpha=0.7,
                                               dsc_beta=1.3, prediction_type=prediction)
    models, distiller = method.models, method.distiller
    teacher1, teacher2, student = _random_lora(params, 10), _random_lora(params, 11), _random_lora(params, 12)
    distiller.teacher1 = teacher1
    distiller.pool = [_random_lora(params, 20), _random_lora(params, 21)]
    distiller.pool[m] = teacher2
    formulas.set_lora(params, student)
    x0 = task.latents[:2]
    timesteps = torch.tensor([[100, 700], [300, 900]])
    noise = torch.randn(2, 2, 4, 8, 8)
    ours, parts = distiller.step_loss(task, x0, m, timesteps, noise, temperature=formulas.TAU)
    ours_grads = torch.autograd.grad(ours, list(params.values()))

    conds = formulas.encode(models, prompts)
    c_n, c_m = conds[0], formulas.encode(models, [PAST[m]])[0]
    with torch.no_grad():
        formulas.set_lora(params, teacher1)
        p_t1, eps_t1 = formulas.log_probs(models, x0, conds, timesteps, noise, formulas.TAU), formulas.predictions(models, x0, c_n, timesteps, noise)
        formulas.set_lora(params, teacher2)
        p_t2, eps_t2 = formulas.log_probs(models, x0, conds, timesteps, noise, formulas.TAU), formulas.predictions(models, x0, c_m, timesteps, noise)
    formulas.set_lora(params, student)
    p_s = formulas.log_probs(models, x0, conds, timesteps, noise, formulas.TAU)
    hand_parts = {"dsc_kl_t1": _kl(p_t1, p_s), "dsc_kl_t2": _kl(p_t2, p_s),
                  "dsc_mse_t1": (formulas.predictions(models, x0, c_n, timesteps, noise) - eps_t1).pow(2).mean(),
                  "dsc_mse_t2": (formulas.predictions(models, x0, c_m, timesteps, noise) - eps_t2).pow(2).mean()}
    hand = (0.7 * (hand_parts["dsc_kl_t1"] + hand_parts["dsc_kl_t2"])
            + 1.3 * (hand_parts["dsc_mse_t1"] + hand_parts["dsc_mse_t2"]))
    hand_grads = torch.autograd.grad(hand, list(params.values()))
    # float32 logits of size err/tau ~ 200 carry ~2e-5 of rounding each (200 x 2^-23); the KLs are differences of
    # them, so the total carries up to 0.7 x 2 KLs x 2e-5 whatever its own size (seen: 7e-6 on another SIMD path).
    for name, value in hand_parts.items():
        assert parts[name] == pytest.approx(value.item(), rel=1e-3), name
    torch.testing.assert_close(ours, hand, rtol=1e-4, atol=0.7 * 2 * 2e-5)
    for a, b in zip(ours_grads, hand_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3 * b.abs().max().item())
    assert all(torch.equal(p.detach(), student[n]) for n, p in params.items())  # teachers swapped back out


@pytest.mark.parametrize("name", ["dsc", "dsc+ewc-dc"])
def test_first_distillation_step_t1_terms_are_exactly_zero(name):
    """The student starts as T1: KL(p_T1 || p_S) and ||eps_S - eps_T1||^2 are 0 at step 1, the T2 terms are not.

    dc_max_batch is pinned: left to the timing-based chunk tuner, the teacher's no-grad pass and the student's
    grad pass may get different chunk sizes on a busy machine, which moves the last bit (a KL of -3.6e-9 seen).
    """
    no_penalty = {"dsc_ewc_penalty": False} if name == "dsc+ewc-dc" else {}  # DSC has no penalty to switch off
    method, params, task = formulas.toy_method(name, index=3, past=PAST, num_dc_concepts=4, dsc_iterations=1,
                                               dc_max_batch=1024, **no_penalty)
    method.distiller.pool = [_random_lora(params, 20), _random_lora(params, 21)]
    logs = method.distiller.distill(task, temperature=formulas.TAU)
    assert logs["dsc_kl_t1"] == 0.0 and logs["dsc_mse_t1"] == 0.0
    assert logs["dsc_kl_t2"] > 0 and logs["dsc_mse_t2"] > 0
    assert any(not torch.equal(p.detach(), method.distiller.teacher1[n]) for n, p in params.items())  # one step taken


@pytest.mark.parametrize("with_penalty", [True, False])
def test_dsc_ewc_dc_penalty_during_distillation(with_penalty):
    """DSC+EWC-DC adds (lambda/2) sum F (theta - theta*)^2 of the earlier tasks to L_DSC (dsc_ewc_penalty)."""
    method, params, task = formulas.toy_method("dsc+ewc-dc", index=3, past=PAST, num_dc_concepts=4, dsc_iterations=1,
                                               dsc_ewc_penalty=with_penalty, ewc_lambda=50.0, learning_rate=1e-2)
    live = lora_state(method.models.unet)
    fisher = {n: torch.rand_like(p) for n, p in params.items()}
    anchor = {n: p.detach() + 0.3 * torch.randn_like(p) for n, p in params.items()}
    for n in params:
        method.fisher.fisher[n].copy_(fisher[n])
    method.anchor = anchor
    pool = [_random_lora(params, 20), _random_lora(params, 21)]
    method.distiller.pool = pool
    generators = (task.generator.get_state(), task.shared_generator.get_state())
    logs = method.distiller.distill(task, formulas.TAU, method.penalty if with_penalty else None)
    after = lora_state(method.models.unet)
    hand = 25.0 * sum((fisher[n] * (live[n] - anchor[n]) ** 2).sum() for n in params).item()
    assert logs.get("dsc_penalty", 0.0) == (pytest.approx(hand, rel=1e-5) if with_penalty else 0.0)
    # The same step without the penalty (same draws): the penalty changed the update.
    formulas.set_lora(params, live)
    task.generator.set_state(generators[0])
    task.shared_generator.set_state(generators[1])
    method.distiller.distill(task, formulas.TAU, None)
    plain = lora_state(method.models.unet)
    assert any(not torch.equal(after[n], plain[n]) for n in params) == with_penalty
    # And through end_task, as the config says.
    formulas.set_lora(params, live)
    metrics = method.end_task(task)
    assert ("dsc_penalty" in metrics) == with_penalty


@pytest.mark.parametrize("pool_choice", ["before_distill", "after_distill"])
def test_dsc_teachers_frozen_and_t2_from_earlier_tasks(make_config, pool_choice):
    config = make_config("dsc", words=("dog", "mug", "cat"), dsc_iterations=4, dsc_teacher_pool=pool_choice)
    trained = {}

    def capture(task, step, models):
        if step == config.max_train_steps:
            trained[task] = {n: p.detach().clone() for n, p in models.lora().items()}

    result = train(config, step_callback=capture)
    distiller = result.method.distiller
    assert distiller.draws[:4] == [1, 1, 1, 1]  # task 2: only LoRA_1 is earlier
    assert set(distiller.draws[4:]) <= {1, 2} and len(distiller.draws) == 8  # task 3: LoRA_1 or LoRA_2, never LoRA_3
    assert len(distiller.pool) == 3
    for i in (1, 2, 3):
        saved = load_tensors(task_dir(config.output_dir, i) / "trainer_state.safetensors")  # after distillation
        want = trained[i] if pool_choice == "before_distill" else {n: saved[f"lora.{n}"] for n in trained[i]}
        assert all(torch.equal(distiller.pool[i - 1][n], want[n]) for n in want), i
        distilled = any(not torch.equal(trained[i][n], saved[f"lora.{n}"]) for n in trained[i])
        assert distilled == (i > 1)  # task 1 has no earlier teacher: nothing distilled
    teacher1 = distiller.teacher1  # T1 of task 3: the LoRA at the end of task 3's training, untouched
    assert all(torch.equal(teacher1[n], trained[3][n]) and not teacher1[n].requires_grad for n in teacher1)
    student = result.method.models.lora()
    assert any(not torch.equal(student[n].detach(), teacher1[n]) for n in teacher1)  # the student moved
    assert result.metrics[2]["temperature"] > 0 and {"dsc_kl_t1", "dsc_kl_t2"} <= set(result.metrics[2])


def test_all_teachers_average_l_dsc_over_every_earlier_lora():
    """dsc_teachers "all": a step's gradient is the mean of L_DSC's gradients over every earlier teacher T2 (the
    expectation the spec's one random draw samples), each taken on its own, with the same (t, eps) for all."""
    method, params, task = formulas.toy_method("dsc", index=3, past=PAST, num_dc_concepts=4, dsc_teachers="all",
                                               dsc_iterations=2)
    distiller = method.distiller
    distiller.teacher1 = _random_lora(params, 10)
    distiller.pool = [_random_lora(params, 20), _random_lora(params, 21)]
    formulas.set_lora(params, _random_lora(params, 12))
    x0, timesteps, noise = task.latents[:2], torch.tensor([[100, 700], [300, 900]]), torch.randn(2, 2, 4, 8, 8)
    each = []
    for m in (0, 1):
        loss, parts = distiller.step_loss(task, x0, m, timesteps, noise, formulas.TAU)
        each.append((torch.autograd.grad(loss, list(params.values())), parts, loss.item()))
    loss, logs = distiller.mean_loss(task, x0, [0, 1], timesteps, noise, formulas.TAU)
    grads = torch.autograd.grad(loss, list(params.values()))
    for g, g0, g1 in zip(grads, each[0][0], each[1][0]):
        torch.testing.assert_close(g, (g0 + g1) / 2, rtol=1e-5, atol=1e-6 * (g0.abs().max() + g1.abs().max()).item())
    assert loss.item() == pytest.approx((each[0][2] + each[1][2]) / 2, rel=1e-5)
    for key in each[0][1]:
        assert logs[key] == pytest.approx((each[0][1][key] + each[1][1][key]) / 2, rel=1e-5), key
    distiller.draws.clear()
    distiller.distill(task, formulas.TAU)
    assert distiller.draws == [1, 2, 1, 2]  # every earlier teacher, every step


@pytest.mark.parametrize("name", ["dsc", "dsc+ewc-dc"])
def test_interleaved_schedule_adds_the_earlier_teachers_terms_to_every_step(name):
    """dsc_schedule "interleaved": a step of task n >= 2 is the method's own loss plus T2's KL and noise terms on
    the same batch (T1's vanish: the student is the LoRA being trained); after the task nothing is distilled and
    the task's LoRA joins the pool."""
    from dcfast.training.objectives import random_pairs

    method, params, task = formulas.toy_method(name, index=3, past=PAST, num_dc_concepts=4,
                                               dsc_schedule="interleaved", dc_max_batch=1024)
    distiller = method.distiller
    distiller.pool = [_random_lora(params, 20), _random_lora(params, 21)]
    x0 = task.latents[:2]
    states = (task.generator.get_state(), task.shared_generator.get_state())
    total, logs = method.loss(x0)
    total.backward()  # the teachers' in-place swaps came before the student's graph
    assert {"dsc_kl_t2", "dsc_mse_t2"} <= logs.keys() and not {"dsc_kl_t1", "dsc_mse_t1"} & logs.keys()
    task.generator.set_state(states[0])
    task.shared_generator.set_state(states[1])
    m = int(torch.randint(2, (1,), generator=task.shared_generator))
    timesteps, noise = random_pairs(method.models.noise_scheduler, x0, method.settings.num_dc_timesteps, task.generator)
    target = distiller.teacher_targets(task, x0, m, timesteps, noise, method.temperature, with_t1=False)
    own = type(method).__mro__[1].loss(method, x0)[0]  # the method's loss without DSC (sequential LoRA / EWC-DC)
    teacher, _ = distiller.student_loss(target, x0, timesteps, noise, method.temperature)
    torch.testing.assert_close(total, own + teacher)
    before = lora_state(method.models.unet)
    metrics = method.end_task(task)
    assert method.consolidation_steps() == 0 and "dsc_loss" not in metrics
    assert len(distiller.pool) == 3 and all(torch.equal(distiller.pool[-1][k], v) for k, v in before.items())


def test_interleaved_dsc_trains_end_to_end_with_every_teacher(make_config):
    config = make_config("dsc", words=("dog", "mug", "cat"), dsc_schedule="interleaved", dsc_teachers="all")
    result = train(config)
    distiller = result.method.distiller
    assert len(distiller.pool) == 3
    steps = config.max_train_steps
    assert distiller.draws == [1] * steps + [1, 2] * steps  # task 2: LoRA_1 each step; task 3: LoRA_1 and LoRA_2
    losses = json.loads((task_dir(config.output_dir, 3) / "losses.json").read_text())
    assert len(losses["train"]["dsc_kl_t2"]) == steps and not losses["distill"]
