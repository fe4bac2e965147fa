"""Offset noise in the denoising loss (TrainConfig.noise_offset), against the formula with the same draws."""
import torch
import torch.nn.functional as F

from dcfast.models.tiny import tiny_scheduler, tiny_unet
from dcfast.training.objectives import denoise_loss


def test_noise_offset_adds_a_per_image_channel_constant_to_eps():
    unet, scheduler = tiny_unet(sample_size=8), tiny_scheduler()
    x0, cond = torch.randn(3, 4, 8, 8), torch.randn(8, 32)
    with torch.no_grad():
        got = denoise_loss(unet, scheduler, x0, cond, torch.Generator().manual_seed(7), noise_offset=0.5)
        plain = denoise_loss(unet, scheduler, x0, cond, torch.Generator().manual_seed(7))
        generator = torch.Generator().manual_seed(7)  # the same draws, in the same order, written out
        t = torch.randint(0, 1000, (3,), generator=generator)
        eps = torch.randn(x0.shape, generator=generator) + 0.5 * torch.randn((3, 4, 1, 1), generator=generator)
        a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        pred = unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, encoder_hidden_states=cond.expand(3, -1, -1)).sample
        expected = F.mse_loss(pred, eps)
    assert torch.allclose(got, expected, rtol=1e-5)
    assert not torch.allclose(got, plain, rtol=1e-3)
