"""The losses the methods combine (docs/design.md): denoising, DC cross-entropies, and per-sample Fisher passes.

Every loss compares the model's output with the scheduler's target (`dcfast.engine.targets.training_target`):
the noise eps for epsilon models, the velocity v = sqrt(abar) eps - sqrt(1 - abar) x0 for v-prediction.

U-Net rows are ordered image-major everywhere ((b, j) for b in images, j in that image's (t, eps)
pairs), so a Fisher pass with `num_samples=B` sees each image's rows together.

Conditions are a `dcfast.models.prompts.Conditions` (or SD's hidden-states tensor); an SDXL model also needs
`time_ids`, one row (n,) per image of x0 (B, n), or one (n,) for all.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from dcfast.engine.scores import dc_logits, dc_scores, dc_scores_with_predictions
from dcfast.engine.targets import default_timesteps, training_target
from dcfast.models.prompts import as_conditions

def denoise_loss(unet, scheduler, x0: torch.Tensor, cond, generator: torch.Generator,
                 noise_offset: float = 0.0, time_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """L_denoise = E ||target - model(x_t, c, t)||^2 with one random (t, eps) per image; cond is (L, D), or
    (B, L, D) for one condition per image.

    target = eps (epsilon models) or v = scheduler.get_velocity(x0, eps, t) (v-prediction models).
    `noise_offset` > 0 adds a per-(image, channel) constant of that std to eps (offset noise, as
    diffusers' training scripts' --noise_offset), so the prompt must carry the image's mean colour.
    """
    B = x0.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (B,), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    if noise_offset > 0:
        noise = noise + noise_offset * torch.randn((B, x0.shape[1], 1, 1), generator=generator).to(x0)
    pred = unet(scheduler.add_noise(x0, noise, t), t, **as_conditions(cond).unet_kwargs(B, time_ids)).sample
    return F.mse_loss(pred.float(), training_target(scheduler, x0, noise, t).float())


def noisy_rows(scheduler, x0: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor):
    """Image-major rows (b, j) of x_t, t and the target (eps or v) for timesteps (B, T) and noise (B, T, C, H, W)."""
    B, T = timesteps.shape
    eps = noise.reshape(B * T, *x0.shape[1:])
    t = timesteps.reshape(-1)
    x0_rows = x0.repeat_interleave(T, dim=0)
    return scheduler.add_noise(x0_rows, eps, t), t, training_target(scheduler, x0_rows, eps, t)


def _row_time_ids(time_ids: Optional[torch.Tensor], T: int) -> Optional[torch.Tensor]:
    """Per-image time ids (B, n) repeated for each image's T rows (b, j); shared (n,) or None as they are."""
    return time_ids.repeat_interleave(T, dim=0) if time_ids is not None and time_ids.dim() == 2 else time_ids


def predict_rows(unet, scheduler, x0: torch.Tensor, cond, timesteps: torch.Tensor, noise: torch.Tensor,
                 time_ids: Optional[torch.Tensor] = None, max_batch: Optional[int] = None,
                 checkpoint: bool = False) -> torch.Tensor:
    """The model's output (eps or v) at x_t, c, t for every row (b, j) under one condition cond (L, D); (B*T, C, H, W).

    `max_batch`: U-Net calls of at most that many rows (as the DC engine's chunks: the same rounding with and
    without `checkpoint`). `checkpoint` (under grad): each call's U-Net activations are recomputed in the backward
    (torch.utils.checkpoint), so the backward peaks at one chunk's, as the DC engine's `checkpoint`."""
    x_t, t, _ = noisy_rows(scheduler, x0, timesteps, noise)
    conds, row_ids = as_conditions(cond), _row_time_ids(time_ids, timesteps.shape[1])
    bounded = checkpoint and torch.is_grad_enabled()

    def predict(x: torch.Tensor, steps: torch.Tensor, ids: Optional[torch.Tensor]) -> torch.Tensor:
        return unet(x, steps, **conds.unet_kwargs(x.shape[0], ids)).sample

    def chunk(i: int, size: int) -> torch.Tensor:
        ids = row_ids[i:i + size] if row_ids is not None and row_ids.dim() == 2 else row_ids
        args = (x_t[i:i + size], t[i:i + size], ids)
        return torch.utils.checkpoint.checkpoint(predict, *args, use_reentrant=False) if bounded else predict(*args)

    size = max_batch or x_t.shape[0]
    return torch.cat([chunk(i, size) for i in range(0, x_t.shape[0], size)])


def per_sample_denoise_losses(unet, scheduler, x0: torch.Tensor, cond, timesteps: torch.Tensor,
                              noise: torch.Tensor, time_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B,) denoising losses, image b averaged over its T pairs; timesteps (B, T), noise (B, T, C, H, W)."""
    x_t, t, target = noisy_rows(scheduler, x0, timesteps, noise)
    rows = x_t.shape[0]
    pred = unet(x_t, t, **as_conditions(cond).unet_kwargs(rows, _row_time_ids(time_ids, timesteps.shape[1]))).sample
    return (pred.float() - target.float()).pow(2).reshape(x0.shape[0], -1).mean(-1)


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


def dc_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log p(c_k | x0) = -logsumexp_j (l_j - l_k) over the last dim, in float64, exact where p(c_k) ~ 1; (..., K).

    log_softmax's gradient at the winning concept is 1 - p_k: zero once p_k rounds to 1, from a logit margin of
    about 17 in float32, 37 in float64. Here, with the gaps g_j = l_j - l_k and m = max_j g_j >= 0,
    -log p_k = m + log1p(sum_{j != k} exp(g_j - m) + expm1(-m)): the value (about exp(-margin)) and its gradient
    (the other concepts' probabilities, summed) hold until those underflow, a margin of about 700.
    """
    l = logits.double()
    gaps = l.unsqueeze(-2) - l.unsqueeze(-1)  # [..., k, j] = l_j - l_k; zero on the diagonal
    top = gaps.amax(-1, keepdim=True)
    others = torch.exp(gaps - top).masked_fill(torch.eye(l.shape[-1], dtype=torch.bool, device=l.device), 0.0)
    return -(top.squeeze(-1) + torch.log1p(others.sum(-1) + torch.expm1(-top.squeeze(-1))))


def dc_log_probs(unet, scheduler, x0: torch.Tensor, conds, timesteps: torch.Tensor, noise: torch.Tensor,
                 temperature: float, loss: str = "l2", max_batch=None,
                 time_ids: Optional[torch.Tensor] = None, checkpoint: bool = False) -> torch.Tensor:
    """log p_theta(c_k | x0) (B, K), float64 (`dc_log_softmax`), from the DC engine over the K concept conditions
    `conds` (K, L, D); `checkpoint`: the engine's chunk recompute (memory of one chunk in the backward)."""
    conds = as_conditions(conds)
    err = dc_scores(unet, scheduler, x0, conds.hidden, timesteps=timesteps, noise=noise, loss=loss, max_batch=max_batch,
                    checkpoint=checkpoint, **conds.engine_kwargs(time_ids))
    return dc_log_softmax(dc_logits(err.double(), temperature))


def dc_log_probs_and_rows(unet, scheduler, x0: torch.Tensor, conds, timesteps: torch.Tensor,
                          noise: torch.Tensor, temperature: float, columns: Sequence[int], loss: str = "l2",
                          max_batch=None, time_ids: Optional[torch.Tensor] = None,
                          checkpoint: bool = False) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """`dc_log_probs` and, from the same pass, the model's outputs under conds[c] for c in `columns`, each
    (B*T, C, H, W) in `predict_rows`' order: the rows a separate `predict_rows` call would compute, not recomputed."""
    conds = as_conditions(conds)
    err, rows = dc_scores_with_predictions(unet, scheduler, x0, conds.hidden, columns, timesteps=timesteps, noise=noise,
                                           loss=loss, max_batch=max_batch, checkpoint=checkpoint,
                                           **conds.engine_kwargs(time_ids))
    log_probs = dc_log_softmax(dc_logits(err.double(), temperature))
    return log_probs, [rows[:, i].reshape(-1, *x0.shape[1:]) for i in range(len(columns))]


def rows_denoise_loss(scheduler, x0: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor,
                      pred: torch.Tensor) -> torch.Tensor:
    """L_denoise over rows (b, j): mean ||target - pred||^2 with pred (B*T, C, H, W) from `predict_rows` or
    `dc_log_probs_and_rows` at timesteps (B, T) and noise (B, T, C, H, W)."""
    _, _, target = noisy_rows(scheduler, x0, timesteps, noise)
    return F.mse_loss(pred.float(), target.float())


def dc_term(log_probs: torch.Tensor, push: str = "spec", smoothing: float = 0.0, c0_weight: float = 1.0) -> torch.Tensor:
    """EWC-DC's DC term over S, averaged over images; columns of `log_probs` (B, K) are [c_n, c_0, earlier ...].

        pull = -sum_i q_i log p(c_i),  q_n = 1 - smoothing, q_i = smoothing / (K - 1)     (0: H(p, c_n))
        push = sum_{i != n} w_i * { -H(p, c_i) = log p(c_i)          "spec": unbounded below
                                  { -log(1 - p(c_i))                 "complement": >= 0
                                  { 0                                "none"
        w_{c_0} = c0_weight, w_i = 1 for the earlier concepts.

    log(1 - p(c_i)) is logsumexp_{j != i} log p(c_j): exact and finite even where p(c_i) rounds to 1.
    """
    B, K = log_probs.shape
    if K < 2:
        raise ValueError(f"log_probs must hold c_n and c_0 at least, got shape {tuple(log_probs.shape)}")
    q = torch.full((K,), smoothing / (K - 1), dtype=log_probs.dtype, device=log_probs.device)
    q[0] = 1.0 - smoothing
    pull = -(log_probs * q).sum(-1)
    weights = torch.ones(K - 1, dtype=log_probs.dtype, device=log_probs.device)
    weights[0] = c0_weight
    if push == "spec":
        pushed = log_probs[:, 1:]
    elif push == "complement":
        others = torch.tensor([[j for j in range(K) if j != i] for i in range(1, K)], device=log_probs.device)
        pushed = -torch.logsumexp(log_probs[:, others], dim=-1)  # (B, K-1): -log(1 - p(c_i))
    elif push == "none":
        return pull.mean()
    else:
        raise ValueError(f"push: {push!r} is not one of spec, complement, none")
    return (pull + (pushed * weights).sum(-1)).mean()


def temperature_from_errors(err: torch.Tensor) -> float:
    """tau for temperature "auto": RMS over images b, concepts k >= 1 and pairs j of err[b,k,j] - err[b,0,j].

    `err` (B, K, T) holds c_n in column 0. Floored at 1e-6 x the mean error, so that a degenerate
    S (identical errors) gives large but finite logits rather than a division by zero.
    """
    gaps = (err[:, 1:] - err[:, :1]).double()
    spread = float(gaps.pow(2).mean().sqrt())
    return max(spread, 1e-6 * float(err.double().abs().mean()), 1e-30)


def shard(num_items: int, rank: int, world: int) -> List[int]:
    """This process's share of item ids (round robin), so the shares of all processes cover every item once."""
    return list(range(rank, num_items, world))


def accumulate_fisher(acc, per_sample_losses: Callable[[List[int]], torch.Tensor], image_ids: Sequence[int],
                      batch_size: int, params: Sequence[torch.nn.Parameter], progress: Optional[str] = None) -> None:
    """Add sum_n g_n^2 over `image_ids` to `acc`, `batch_size` images per backward (a sample never split).

    `per_sample_losses(ids)` returns the (len(ids),) losses whose gradients are the per-sample ones.
    The .grad fields the backward passes leave on `params` are cleared afterwards. `progress`: the label of
    a progress bar over the backward passes (None: no bar).
    """
    from tqdm.auto import tqdm

    ids = list(image_ids)
    for start in tqdm(range(0, len(ids), batch_size), desc=progress, disable=progress is None, leave=False):
        chunk = ids[start:start + batch_size]
        with acc.track(num_samples=len(chunk)):
            per_sample_losses(chunk).sum().backward()
    for p in params:
        p.grad = None
