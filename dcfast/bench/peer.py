"""The peer baseline: Diffusion Classifier's batching strategy (Li et al. 2023, `eval_error`), written anew.

Per image, the K*T evaluations become three flat lists - timestep, noise index, prompt index - one
entry per (prompt, timestep) triple, prompt-major. They are cut into U-Net batches of 32 rows; each
batch gathers its noises and prompt embeddings by index, noises the image, runs the U-Net under
inference mode and reduces the per-row error. Nothing is shared across prompts or images.

This is the strategy of the public repository, reimplemented for the benchmark (its code is not
copied): `dcfast bench dc-scores` reports `speedup_vs_peer` against it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from dcfast.engine.targets import prepare_inputs

PEER_BATCH = 32  # rows per U-Net call in the public code's default


def dc_scores_peer(unet, scheduler, x0: torch.Tensor, cond: torch.Tensor, *, timesteps=None, noise=None,
                   num_timesteps: int = 8, generator: Optional[torch.Generator] = None, loss: str = "l2",
                   batch_size: int = PEER_BATCH, **_ignored) -> torch.Tensor:
    """err (B, K, T) as the peer computes it: per image, flat (t, eps, prompt) triples in batches of `batch_size`.

    Epsilon-prediction only (as the public code); `loss` in l2 / l1 / huber.
    """
    inputs = prepare_inputs(unet, scheduler, x0, cond, timesteps=timesteps, noise=noise,
                            num_timesteps=num_timesteps, generator=generator)
    if inputs.prediction != "epsilon":
        raise ValueError("the peer baseline compares against the noise: epsilon-prediction models only")
    reduce = {"l2": F.mse_loss, "l1": F.l1_loss, "huber": F.huber_loss}[loss]
    B, T = inputs.shape
    K = cond.shape[0]
    alphas = scheduler.alphas_cumprod
    out = torch.zeros(B, K * T)
    with torch.inference_mode():
        for b in range(B):
            # The flat triple lists of one image: prompt-major, then timestep.
            step_of = [inputs.timesteps[b, j].item() for _ in range(K) for j in range(T)]
            noise_of = [j for _ in range(K) for j in range(T)]
            prompt_of = [k for k in range(K) for _ in range(T)]
            image_noise = inputs.noise[b]
            for start in range(0, K * T, batch_size):
                stop = min(start + batch_size, K * T)
                t = torch.tensor(step_of[start:stop])
                eps = image_noise[noise_of[start:stop]]
                abar = alphas[t].to(x0.device, x0.dtype).view(-1, 1, 1, 1)
                x_t = x0[b] * abar.sqrt() + eps * (1 - abar).sqrt()
                text = cond[prompt_of[start:stop]]
                pred = unet(x_t, t.to(x0.device), encoder_hidden_states=text).sample
                per_row = reduce(pred.float(), eps.float(), reduction="none").mean(dim=(1, 2, 3))
                out[b, start:stop] = per_row.cpu()
    return out.view(B, K, T).to(x0.device)
