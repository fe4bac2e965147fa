"""Naive references: the plain Python loops that dcfast's engines replace, baselines of every test and benchmark."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from dcfast.scores import prepare_inputs

_ELEMENTWISE = {
    "l2": lambda pred, target, delta: F.mse_loss(pred, target, reduction="none"),
    "l1": lambda pred, target, delta: F.l1_loss(pred, target, reduction="none"),
    "huber": lambda pred, target, delta: F.huber_loss(pred, target, reduction="none", delta=delta),
}


def dc_scores_naive(unet, scheduler, x0: torch.Tensor, cond: torch.Tensor, *, timesteps=None, noise=None,
                    num_timesteps: int = 8, generator: Optional[torch.Generator] = None, loss: str = "l2",
                    max_batch: Optional[int] = None, huber_delta: float = 1.0) -> torch.Tensor:
    """`dcfast.dc_scores` as a loop: one U-Net call of batch B per (concept, timestep). `max_batch` is ignored."""
    if loss not in _ELEMENTWISE:
        raise ValueError(f"loss must be one of {tuple(_ELEMENTWISE)}, got {loss!r}")
    inputs = prepare_inputs(unet, scheduler, x0, cond, timesteps=timesteps, noise=noise,
                            num_timesteps=num_timesteps, generator=generator)
    B, T = inputs.shape
    images = torch.arange(B, device=x0.device)
    errors = []
    for k in range(cond.shape[0]):
        per_concept = []
        for j in range(T):
            step = torch.full((B,), j, device=x0.device)
            pred = unet(inputs.x_t(images, step), inputs.timesteps[:, j],
                        encoder_hidden_states=cond[k:k + 1].expand(B, -1, -1), return_dict=False)[0]
            elementwise = _ELEMENTWISE[loss](pred.float(), inputs.noise[:, j].float(), huber_delta)
            per_concept.append(elementwise.flatten(1).mean(1))
        errors.append(torch.stack(per_concept, dim=1))
    return torch.stack(errors, dim=1)
