"""Naive references: the plain Python loops that dcfast's engines replace, baselines of every test and benchmark."""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from dcfast.engine.targets import prepare_inputs

_ELEMENTWISE = {
    "l2": lambda pred, target, delta: F.mse_loss(pred, target, reduction="none"),
    "l1": lambda pred, target, delta: F.l1_loss(pred, target, reduction="none"),
    "huber": lambda pred, target, delta: F.huber_loss(pred, target, reduction="none", delta=delta),
}


def dc_scores_naive(unet, scheduler, x0: torch.Tensor, cond: torch.Tensor, *, timesteps=None, noise=None,
                    num_timesteps: int = 8, generator: Optional[torch.Generator] = None, loss: str = "l2",
                    max_batch: Optional[int] = None, huber_delta: float = 1.0,
                    added_cond_kwargs: Optional[dict] = None) -> torch.Tensor:
    """`dcfast.dc_scores` as a loop: one U-Net call of batch B per (concept, timestep). `max_batch` is ignored.

    The target is the noise, or `scheduler.get_velocity(x0, eps, t)` for v-prediction schedulers. An SDXL U-Net
    gets concept k's pooled text embedding and every image's time ids as diffusers' `added_cond_kwargs`.
    """
    if loss not in _ELEMENTWISE:
        raise ValueError(f"loss must be one of {tuple(_ELEMENTWISE)}, got {loss!r}")
    inputs = prepare_inputs(unet, scheduler, x0, cond, timesteps=timesteps, noise=noise,
                            num_timesteps=num_timesteps, generator=generator, added_cond_kwargs=added_cond_kwargs)
    B, T = inputs.shape
    images = torch.arange(B, device=x0.device)
    errors = []
    for k in range(cond.shape[0]):
        per_concept = []
        for j in range(T):
            step = torch.full((B,), j, device=x0.device)
            added = {} if inputs.text_embeds is None else {"added_cond_kwargs": {
                "text_embeds": inputs.text_embeds[k:k + 1].expand(B, -1), "time_ids": inputs.time_ids}}
            pred = unet(inputs.x_t(images, step), inputs.timesteps[:, j],
                        encoder_hidden_states=cond[k:k + 1].expand(B, -1, -1), return_dict=False, **added)[0]
            target = inputs.noise[:, j]
            if getattr(scheduler, "config", {}).get("prediction_type", "epsilon") == "v_prediction":
                target = scheduler.get_velocity(x0, target, inputs.timesteps[:, j])  # diffusers' own v
            elementwise = _ELEMENTWISE[loss](pred.float(), target.float(), huber_delta)
            per_concept.append(elementwise.flatten(1).mean(1))
        errors.append(torch.stack(per_concept, dim=1))
    return torch.stack(errors, dim=1)


def _tracked_names(model: torch.nn.Module, params: Optional[Iterable[str]]) -> list:
    named = dict(model.named_parameters())
    names = [n for n, p in named.items() if p.requires_grad] if params is None else list(params)
    unknown = [n for n in names if n not in named]
    if unknown:
        raise ValueError(f"params: {unknown[0]!r} is not a parameter name of {type(model).__name__}")
    return names


def fisher_naive(model: torch.nn.Module, per_sample_loss_fn: Callable[[int], torch.Tensor], num_samples: int,
                 params: Optional[Iterable[str]] = None) -> Dict[str, torch.Tensor]:
    """The per-sample Fisher as a loop: `sum_n (d loss_n / d theta)**2` by N separate backward passes.

    per_sample_loss_fn(n) runs sample n's forward and returns its scalar loss. `params`: names as in
    `model.named_parameters()` (default: every parameter that requires grad). Returns float64 sums.
    """
    named = dict(model.named_parameters())
    names = _tracked_names(model, params)
    tensors = [named[n] for n in names]
    fisher = {n: torch.zeros(named[n].shape, dtype=torch.float64, device=named[n].device) for n in names}
    for n in range(num_samples):
        grads = torch.autograd.grad(per_sample_loss_fn(n), tensors, allow_unused=True)
        for name, g in zip(names, grads):
            if g is not None:
                fisher[name] += g.double().square()
    return fisher


def fisher_vmap(model: torch.nn.Module, losses_fn: Callable[..., torch.Tensor], samples: Sequence[torch.Tensor],
                params: Optional[Iterable[str]] = None) -> Dict[str, torch.Tensor]:
    """The per-sample Fisher by torch.func: vmap over the samples of grad of one sample's loss.

    losses_fn(forward, *batch) -> (B,) per-sample losses, where `forward(*args, **kwargs)` runs the
    model and `batch` holds B-sample slices of `samples` (tensors (N, ...)); called with B = 1 per
    sample under vmap. Materialises all N per-sample gradients. Returns float64 sums.
    """
    from torch.func import functional_call, grad, vmap

    named = dict(model.named_parameters())
    tracked = {n: named[n].detach() for n in _tracked_names(model, params)}

    def sample_loss(values, *sample):
        def forward(*args, **kwargs):
            return functional_call(model, values, args, kwargs)

        return losses_fn(forward, *(s.unsqueeze(0) for s in sample))[0]

    grads = vmap(grad(sample_loss), in_dims=(None,) + (0,) * len(samples))(tracked, *samples)
    return {n: g.double().square().sum(0) for n, g in grads.items()}
