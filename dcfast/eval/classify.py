"""Diffusion-classifier (DC) classification with adaptive candidate elimination.

Following Diffusion Classifier (Li et al., 2023, "Your Diffusion Model is Secretly a Zero-Shot
Classifier"): every image gets a fixed pool of T (timestep, noise) pairs, the timesteps evenly strided
(`dcfast.engine.targets.default_timesteps`) and the noise shared by all candidates. Classification runs in
stages `((n_1, keep_1), ..., (n_S, keep_S))`: stage s scores the surviving candidates on n_s pairs
of the pool (errors of earlier stages are reused, never recomputed) and keeps the `keep_s` with the
lowest mean error. All candidates are scored on the first few pairs only; the rest of the budget is
spent on the likely ones. The prediction is the candidate with the lowest mean error in the last stage.
Exhaustive scoring is the one-stage schedule `((T, 1),)`.

Stage s uses pool indices `range(0, T, T // n_s)[:n_s]`, so the pairs are nested (each stage reuses
all of the previous one) when every n_s divides the next and T = n_S.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from dcfast.engine.scores import dc_scores
from dcfast.models.prompts import as_conditions
from dcfast.engine.targets import default_timesteps

# Diffusion Classifier uses ((50, 5), (500, 1)) for Stable Diffusion with ~10^3 classes. Here candidate
# sets are small (seen concepts + c_0) and the default must fit a CPU: score everything on 8 pairs,
# keep the best 2, give them 32 in all. With K candidates that is 8K + 48 U-Net rows per image
# instead of the exhaustive 32K (K=5: 88 vs 160).
DEFAULT_STAGES: Tuple[Tuple[int, int], ...] = ((8, 2), (32, 1))


@dataclass
class ClassifyResult:
    """Predicted candidate per image, mean errors (B, K; NaN = never scored), cost and time."""

    predictions: torch.Tensor  # (B,) long, index into the K candidates
    errors: torch.Tensor  # (B, K) mean DC error over the pairs each candidate was last scored on
    unet_evals: int  # U-Net rows evaluated in all
    seconds_per_image: float


def check_stages(stages: Sequence[Tuple[int, int]]) -> Tuple[Tuple[int, int], ...]:
    """Validate a schedule: non-empty, n_s >= 1 non-decreasing, keep_s >= 1."""
    stages = tuple((int(n), int(keep)) for n, keep in stages)
    if not stages:
        raise ValueError("stages must hold at least one (num_pairs, keep) stage")
    for s, (n, keep) in enumerate(stages):
        if n < 1 or keep < 1:
            raise ValueError(f"stage {s} is {(n, keep)}: num_pairs and keep must be >= 1")
        if s and n < stages[s - 1][0]:
            raise ValueError(f"stages must not shrink the budget: stage {s} has {n} pairs after {stages[s - 1][0]}")
    return stages


def classify(unet, scheduler, x0: torch.Tensor, cond, *,
             stages: Sequence[Tuple[int, int]] = DEFAULT_STAGES, generator: Optional[torch.Generator] = None,
             loss: str = "l2", max_batch: Optional[int] = None,
             time_ids: Optional[torch.Tensor] = None) -> ClassifyResult:
    """Classify images x0 (B, C, H, W) among candidate conditions cond (K, L, D) by adaptive elimination.

    `cond` is a tensor of hidden states or a `Conditions` (SDXL: with pooled embeddings, and then `time_ids`, (6,)
    for every image or (B, 6)). The pool has T = stages[-1][0] pairs; noise (B, T, C, H, W) is drawn from `generator`.
    """
    stages = check_stages(stages)
    conds = as_conditions(cond)
    cond = conds.hidden
    if time_ids is not None and time_ids.dim() == 1:
        time_ids = time_ids.expand(x0.shape[0], -1)
    if x0.dim() != 4 or cond.dim() != 3:
        raise ValueError(f"x0 must be (B, C, H, W) and cond (K, L, D), got {tuple(x0.shape)} and {tuple(cond.shape)}")
    start = time.perf_counter()
    B, K = x0.shape[0], cond.shape[0]
    pool = stages[-1][0]
    timesteps = default_timesteps(scheduler.config.num_train_timesteps, pool).to(x0.device)
    noise_device = generator.device if generator is not None else x0.device
    noise = torch.randn((B, pool, *x0.shape[1:]), generator=generator, device=noise_device).to(x0.device, x0.dtype)
    cache = torch.full((B, K, pool), float("nan"), dtype=torch.float64)
    survivors = [tuple(range(K))] * B
    done: set = set()  # pool indices already scored for every current survivor
    evals = 0
    with torch.no_grad():
        for n, keep in stages:
            idx = list(range(0, pool, pool // n))[:n]
            new = [i for i in idx if i not in done]
            if new:
                groups = defaultdict(list)  # images with the same survivors share one batched pass
                for b, cands in enumerate(survivors):
                    groups[cands].append(b)
                for cands, images in groups.items():
                    chosen = conds[list(cands)]
                    err = dc_scores(unet, scheduler, x0[images], chosen.hidden, timesteps=timesteps[new],
                                    noise=noise[images][:, new], loss=loss, max_batch=max_batch,
                                    **chosen.engine_kwargs(None if time_ids is None else time_ids[images]))
                    cache[torch.tensor(images)[:, None, None], torch.tensor(cands)[None, :, None],
                          torch.tensor(new)[None, None, :]] = err.double().cpu()
                    evals += len(images) * len(cands) * len(new)
            done.update(new)
            mean = cache[:, :, idx].mean(-1)  # NaN for eliminated candidates
            survivors = [tuple(sorted(sorted(cands, key=lambda k: mean[b, k].item())[:keep]))
                         for b, cands in enumerate(survivors)]
    final = cache[:, :, idx].mean(-1)
    errors = torch.where(final.isnan(), cache.nanmean(-1), final)
    predictions = torch.nan_to_num(final, nan=float("inf")).argmin(-1)
    return ClassifyResult(predictions=predictions, errors=errors, unet_evals=evals,
                          seconds_per_image=(time.perf_counter() - start) / max(B, 1))


def classify_exhaustive(unet, scheduler, x0: torch.Tensor, cond, *, num_timesteps: int = 32,
                        generator: Optional[torch.Generator] = None, loss: str = "l2",
                        max_batch: Optional[int] = None, time_ids: Optional[torch.Tensor] = None) -> ClassifyResult:
    """Score every candidate on all `num_timesteps` pairs (the one-stage schedule)."""
    return classify(unet, scheduler, x0, cond, stages=((num_timesteps, 1),), generator=generator,
                    loss=loss, max_batch=max_batch, time_ids=time_ids)
