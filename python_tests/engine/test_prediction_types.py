"""v-prediction models through the DC engine, the denoising losses and classification, against loops written
from the formula v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0; "sample" models refused with a clear message."""
import pytest
import torch
from diffusers import DDPMScheduler

import dcfast
from dcfast.eval.classify import classify_exhaustive
from dcfast.training.objectives import denoise_loss, per_sample_denoise_losses
from dcfast.engine.reference import dc_scores_naive
from dcfast.engine.targets import default_timesteps

B, K, T, C, S = 2, 3, 2, 4, 16


@pytest.fixture(scope="module")
def v_scheduler(scheduler):
    return DDPMScheduler.from_config(scheduler.config, prediction_type="v_prediction")


def _problem(seed=0, shared_noise=False):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, C, S, S, generator=g)
    cond = torch.randn(K, 5, 32, generator=g)
    timesteps = torch.randint(0, 1000, (B, T), generator=g)
    noise = torch.randn((T, C, S, S) if shared_noise else (B, T, C, S, S), generator=g)
    return x0, cond, timesteps, noise


def _formula_errors(unet, scheduler, x0, cond, timesteps, noise):
    """err[b,k,j] = mean (v[b,j] - v_theta(x_t[b,j], c_k, t[b,j]))^2, one U-Net call per (b, k, j), float64 sums."""
    noise = noise.expand(B, T, C, S, S)
    err = torch.zeros(B, K, T, dtype=torch.float64)
    for b in range(B):
        for j in range(T):
            a = scheduler.alphas_cumprod[timesteps[b, j]]
            x_t = a.sqrt() * x0[b] + (1 - a).sqrt() * noise[b, j]
            v = a.sqrt() * noise[b, j] - (1 - a).sqrt() * x0[b]
            for k in range(K):
                pred = unet(x_t[None], timesteps[b, j][None], encoder_hidden_states=cond[k:k + 1]).sample[0]
                err[b, k, j] = (v.double() - pred.double()).pow(2).mean()
    return err


@pytest.mark.parametrize("shared_noise, max_batch", [(False, None), (False, 5), (True, 1)],
                         ids=["unchunked", "chunk5", "shared-noise-chunk1"])
def test_engine_v_target_matches_formula(unet, v_scheduler, scheduler, shared_noise, max_batch):
    x0, cond, timesteps, noise = _problem(shared_noise=shared_noise)
    with torch.no_grad():
        fused = dcfast.dc_scores(unet, v_scheduler, x0, cond, timesteps=timesteps, noise=noise, max_batch=max_batch)
        naive = dc_scores_naive(unet, v_scheduler, x0, cond, timesteps=timesteps, noise=noise)  # get_velocity
        formula = _formula_errors(unet, v_scheduler, x0, cond, timesteps, noise)
        eps = dcfast.dc_scores(unet, scheduler, x0, cond, timesteps=timesteps, noise=noise)
    scale = formula.abs().max()
    assert (fused.double() - formula).abs().max() <= 1e-5 * scale
    assert (naive.double() - formula).abs().max() <= 1e-5 * scale
    assert (eps.double() - formula).abs().max() > 1e-2 * scale  # the epsilon target is a different number


@pytest.mark.parametrize("max_batch", [1, 5], ids=["chunk1", "chunk5"])
def test_memory_bounded_gradient_with_v_target(unet, v_scheduler, max_batch):
    """v depends on x0: dc_loss_backward gives x0 the gradient of both x_t and v, chunk by chunk."""
    x0, cond, timesteps, noise = _problem(seed=3)

    def loss_fn(err):
        return torch.nn.functional.cross_entropy(dcfast.dc_logits(err, 0.1), torch.arange(B) % K)

    x0_param = x0.clone().requires_grad_(True)
    expected_loss = loss_fn(_formula_errors(unet, v_scheduler, x0_param * 1.0, cond, timesteps, noise).float())
    (expected,) = torch.autograd.grad(expected_loss, x0_param)
    value, _ = dcfast.dc_loss_backward(unet, v_scheduler, x0_param * 1.0, cond, loss_fn, timesteps=timesteps,
                                       noise=noise, max_batch=max_batch)
    unet.zero_grad(set_to_none=True)
    assert abs(value.item() - expected_loss.item()) <= 1e-5 * abs(expected_loss.item())
    assert ((x0_param.grad - expected).norm() / expected.norm()).item() <= 1e-4


def test_denoise_losses_use_velocity(unet, v_scheduler):
    x0, cond, timesteps, noise = _problem(seed=4)
    with torch.no_grad():
        ours = per_sample_denoise_losses(unet, v_scheduler, x0, cond[0], timesteps, noise)
        want = _formula_errors(unet, v_scheduler, x0, cond[:1].expand(K, -1, -1), timesteps, noise)[:, 0].mean(-1)
        torch.testing.assert_close(ours.double(), want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
        # the random-pair loss: replay its draws from the same generator seed
        g = torch.Generator().manual_seed(7)
        t = torch.randint(0, 1000, (B,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = v_scheduler.alphas_cumprod[t].view(B, 1, 1, 1)
        pred = unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, encoder_hidden_states=cond[:1].expand(B, -1, -1)).sample
        want = (pred - (a.sqrt() * eps - (1 - a).sqrt() * x0)).pow(2).mean()
        got = denoise_loss(unet, v_scheduler, x0, cond[0], torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_classification_scores_against_v(unet, v_scheduler):
    x0, cond, _, _ = _problem(seed=5)
    with torch.no_grad():
        result = classify_exhaustive(unet, v_scheduler, x0, cond, num_timesteps=2, generator=torch.Generator().manual_seed(1))
        noise = torch.randn((B, 2, C, S, S), generator=torch.Generator().manual_seed(1))
        want = _formula_errors(unet, v_scheduler, x0, cond, default_timesteps(1000, 2).expand(B, -1), noise).mean(-1)
    torch.testing.assert_close(result.errors, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
    assert torch.equal(result.predictions, want.argmin(-1))


def test_sample_prediction_is_refused(unet, scheduler):
    from types import SimpleNamespace

    from dcfast.eval.sampling import pipeline_prediction_type

    sample = DDPMScheduler.from_config(scheduler.config, prediction_type="sample")
    x0, cond, timesteps, noise = _problem()
    with pytest.raises(ValueError, match=r"prediction_type 'sample' is not supported; .* epsilon and v_prediction"):
        dcfast.dc_scores(unet, sample, x0, cond, timesteps=timesteps, noise=noise)
    with pytest.raises(ValueError, match=r"run/x task 2: scheduler prediction_type 'sample' is not supported"):
        pipeline_prediction_type(SimpleNamespace(scheduler=sample), "run/x task 2")
    assert pipeline_prediction_type(SimpleNamespace(scheduler=scheduler), "x") == "epsilon"
