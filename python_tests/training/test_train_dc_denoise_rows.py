"""dc_denoise_rows: EWC-DC's denoising loss and DSC's noise distillation read from the DC pass's own rows.

Given the same (t, eps) pairs, the losses and their LoRA gradients must equal those of the separate U-Net
calls they replace (to 1e-5 of their scale), for epsilon and v-prediction models.
"""
import pytest
import torch

import formulas
from dcfast.training.adapters import lora_state
from dcfast.training.config import TrainConfig
from dcfast.training.objectives import predict_rows, rows_denoise_loss

S = [formulas.PROMPT, formulas.CLASS_PROMPT, "a photo of red cat"]


def _pairs(seed=0, images=2, pairs=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1000, (images, pairs), generator=g), torch.randn(images, pairs, 4, 8, 8, generator=g)


def _assert_same(ours, theirs, params):
    """Values and LoRA gradients equal to 1e-5 of their scale."""
    ours_grads = torch.autograd.grad(ours, params)
    theirs_grads = torch.autograd.grad(theirs, params)
    assert abs(ours.item() - theirs.item()) <= 1e-5 * abs(theirs.item())
    flat = lambda grads: torch.cat([g.flatten() for g in grads])  # noqa: E731
    a, b = flat(ours_grads), flat(theirs_grads)
    assert b.norm() > 0 and ((a - b).norm() / b.norm()).item() <= 1e-5


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ewc_dc_denoising_loss_from_dc_rows_equals_the_separate_call(prediction):
    method, params, task = formulas.toy_method("ewc-dc", dc_denoise_rows=True, prediction_type=prediction)
    models = method.models
    conds = formulas.encode(models, S)
    x0 = task.latents[:2]
    timesteps, noise = _pairs()
    denoise, dc = method.denoise_and_dc(x0, conds, timesteps, noise)
    separate = rows_denoise_loss(models.noise_scheduler, x0, timesteps, noise,
                                 predict_rows(models.unet, models.noise_scheduler, x0, conds[0], timesteps, noise))
    by_hand = (formulas.predictions(models, x0, conds[0], timesteps, noise)
               - formulas.targets(models, x0, timesteps, noise)).pow(2).mean()
    params = list(params.values())
    _assert_same(denoise, separate, params)
    denoise, dc = method.denoise_and_dc(x0, conds, timesteps, noise)
    _assert_same(denoise, by_hand, params)
    delta = 0.1  # the step's loss: L_denoise + delta * DC term, one pass against two
    denoise, dc = method.denoise_and_dc(x0, conds, timesteps, noise)
    separate = rows_denoise_loss(models.noise_scheduler, x0, timesteps, noise,
                                 predict_rows(models.unet, models.noise_scheduler, x0, conds[0], timesteps, noise))
    _assert_same(denoise + delta * dc, separate + delta * method.dc_loss(x0, conds, timesteps, noise), params)


def test_ewc_dc_step_takes_no_separate_denoising_call():
    """With the option the step's U-Net rows are the DC pass's B*K*T only."""
    method, _, task = formulas.toy_method("ewc-dc", dc_denoise_rows=True, num_dc_timesteps=2)
    rows = []
    handle = method.models.unet.conv_in.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    try:
        loss, logs = method.loss(task.latents[:2])
    finally:
        handle.remove()
    assert sum(rows) == 2 * 3 * 2  # B=2 images x K=3 concepts x T=2 pairs, nothing more
    assert torch.isfinite(loss) and set(logs) >= {"denoise", "dc", "penalty"}


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_dsc_noise_distillation_from_dc_rows_equals_the_separate_calls(prediction):
    method, params, task = formulas.toy_method("dsc", index=3, past=("a photo of red cat", "a photo of blue mug"),
                                               num_dc_concepts=4, prediction_type=prediction)
    distiller = method.distiller
    distiller.teacher1 = {n: p + 0.05 * torch.randn_like(p) for n, p in lora_state(method.models.unet).items()}
    distiller.pool = [{n: p - 0.05 * torch.randn_like(p) for n, p in lora_state(method.models.unet).items()}] * 2
    x0 = task.latents[:2]
    timesteps, noise = _pairs(seed=1, pairs=2)
    params = list(params.values())
    results = {}
    for rows in (False, True):  # each loss differentiated before the next swaps teachers into the LoRA in place
        method.settings.dc_denoise_rows = rows
        loss, parts = distiller.step_loss(task, x0, 1, timesteps, noise, formulas.TAU)
        results[rows] = loss.detach(), parts, torch.autograd.grad(loss, params)
    (separate, parts, grads), (ours, ours_parts, ours_grads) = results[False], results[True]
    for name in ("dsc_mse_t1", "dsc_mse_t2", "dsc_kl_t1", "dsc_kl_t2"):
        assert ours_parts[name] == pytest.approx(parts[name], rel=1e-5)
    assert abs(ours.item() - separate.item()) <= 1e-5 * abs(separate.item())
    a, b = torch.cat([g.flatten() for g in ours_grads]), torch.cat([g.flatten() for g in grads])
    assert b.norm() > 0 and ((a - b).norm() / b.norm()).item() <= 1e-5


def test_dc_denoise_rows_refuses_offset_noise(make_config):
    with pytest.raises(ValueError, match="dc_denoise_rows: the DC pass's noise has no offset"):
        make_config("ewc-dc", dc_denoise_rows=True, noise_offset=0.1).validate()
    assert TrainConfig(method="ewc-dc").method_settings.dc_denoise_rows is False


@pytest.mark.parametrize("method", ["ewc-dc", "dsc+ewc-dc"])
def test_training_with_dc_denoise_rows(make_config, method):
    from dcfast.training.trainer import train

    result = train(make_config(method, dc_denoise_rows=True))
    assert all(torch.isfinite(torch.tensor(m["final_loss"])) for m in result.metrics)
