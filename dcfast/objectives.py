"""The losses the methods combine (DESIGN 1): denoising, DC cross-entropies, and per-sample Fisher passes.

U-Net rows are ordered image-major everywhere ((b, j) for b in images, j in that image's (t, eps)
pairs), so a Fisher pass with `num_samples=B` sees each image's rows together.
"""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from dcfast.scores import dc_logits, dc_scores, default_timesteps


def denoise_loss(unet, scheduler, x0: torch.Tensor, cond: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """L_denoise = E ||eps - eps_theta(x_t, c, t)||^2 with one random (t, eps) per image; cond is (L, D)."""
    B = x0.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (B,), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    pred = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=cond.expand(B, -1, -1)).sample
    return F.mse_loss(pred.float(), noise.float())


def noisy_rows(scheduler, x0: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor):
    """Image-major rows (b, j) of x_t, t and eps for timesteps (B, T) and noise (B, T, C, H, W)."""
    B, T = timesteps.shape
    eps = noise.reshape(B * T, *x0.shape[1:])
    t = timesteps.reshape(-1)
    return scheduler.add_noise(x0.repeat_interleave(T, dim=0), eps, t), t, eps


def predict_rows(unet, scheduler, x0: torch.Tensor, cond: torch.Tensor, timesteps: torch.Tensor,
                 noise: torch.Tensor) -> torch.Tensor:
    """eps_theta(x_t, c, t) for every row (b, j) under one condition cond (L, D); (B*T, C, H, W)."""
    x_t, t, _ = noisy_rows(scheduler, x0, timesteps, noise)
    return unet(x_t, t, encoder_hidden_states=cond.expand(x_t.shape[0], -1, -1)).sample


def per_sample_denoise_losses(unet, scheduler, x0: torch.Tensor, cond: torch.Tensor, timesteps: torch.Tensor,
                              noise: torch.Tensor) -> torch.Tensor:
    """(B,) denoising losses, image b averaged over its T pairs; timesteps (B, T), noise (B, T, C, H, W)."""
    pred = predict_rows(unet, scheduler, x0, cond, timesteps, noise)
    _, _, eps = noisy_rows(scheduler, x0, timesteps, noise)
    return (pred.float() - eps.float()).pow(2).reshape(x0.shape[0], -1).mean(-1)


def random_pairs(scheduler, x0: torch.Tensor, num_timesteps: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random (t, eps) pairs for a DC pass: timesteps (B, T) and noise (B, T, C, H, W)."""
    B = x0.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (B, num_timesteps), generator=generator)
    noise = torch.randn((B, num_timesteps, *x0.shape[1:]), generator=generator)
    return t.to(x0.device), noise.to(x0)


def fisher_pairs(scheduler, x0: torch.Tensor, image_ids: Sequence[int], num_timesteps: int,
                 seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Deterministic per-image (t, eps) for the Fisher: evenly strided t, noise seeded by (seed, image id).

    The Fisher therefore depends on the image set only, not on how images are split over processes.
    """
    B = x0.shape[0]
    t = default_timesteps(scheduler.config.num_train_timesteps, num_timesteps).expand(B, -1)
    noise = torch.stack([torch.randn((num_timesteps, *x0.shape[1:]), generator=torch.Generator().manual_seed(seed * 100003 + i))
                         for i in image_ids])
    return t.to(x0.device), noise.to(x0)


def dc_log_probs(unet, scheduler, x0: torch.Tensor, conds: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor,
                 temperature: float, loss: str = "l2", max_batch=None) -> torch.Tensor:
    """log p_theta(c_k | x0) (B, K) from the DC engine over the K concept conditions `conds` (K, L, D)."""
    err = dc_scores(unet, scheduler, x0, conds, timesteps=timesteps, noise=noise, loss=loss, max_batch=max_batch)
    return torch.log_softmax(dc_logits(err, temperature).float(), dim=-1)


def dc_term(log_probs: torch.Tensor, own: int = 0) -> torch.Tensor:
    """EWC-DC's term sum_{i in S} (2*1[i=n] - 1) H(p, c_i), H = -log p(c_i), averaged over images.

    Column `own` is the task's concept c_n (pulled toward); every other column is pushed away.
    """
    signs = -torch.ones(log_probs.shape[1], device=log_probs.device, dtype=log_probs.dtype)
    signs[own] = 1.0
    return (signs * -log_probs).sum(-1).mean()


def shard(num_items: int, rank: int, world: int) -> List[int]:
    """This process's share of item ids (round robin), so the shares of all processes cover every item once."""
    return list(range(rank, num_items, world))


def accumulate_fisher(acc, per_sample_losses: Callable[[List[int]], torch.Tensor], image_ids: Sequence[int],
                      batch_size: int, params: Sequence[torch.nn.Parameter]) -> None:
    """Add sum_n g_n^2 over `image_ids` to `acc`, `batch_size` images per backward (a sample never split).

    `per_sample_losses(ids)` returns the (len(ids),) losses whose gradients are the per-sample ones.
    The .grad fields the backward passes leave on `params` are cleared afterwards.
    """
    ids = list(image_ids)
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        with acc.track(num_samples=len(chunk)):
            per_sample_losses(chunk).sum().backward()
    for p in params:
        p.grad = None
