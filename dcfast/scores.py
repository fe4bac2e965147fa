"""The DC score engine (DESIGN 1, 2.1-2.2): all B*K*T U-Net evaluations of a batch in one chunked pass.

For images x0 (B, C, H, W), concept conditions cond (K, L, D) and T (timestep, noise) pairs shared by
every concept,

    x_t[b,j]   = sqrt(abar[t_j]) x0[b] + sqrt(1 - abar[t_j]) eps[b,j]
    err[b,k,j] = mean_{C,H,W} loss(target[b,j] - model_theta(x_t[b,j], cond[k], t_j))

The target is the scheduler's `prediction_type`: eps[b,j] for "epsilon", the velocity
v[b,j] = sqrt(abar[t_j]) eps[b,j] - sqrt(1 - abar[t_j]) x0[b] for "v_prediction" (computed once per
(b, j), never per concept); "sample" models are refused.

The U-Net sees rows ordered (b, k, j), image-major, so a module hook sees each image's K*T rows
together (what dcfast.FisherAccumulator relies on). The target is never repeated K times: the fused
`dc_error` op reads it in place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from dcfast.ops.dc_error import LOSSES, dc_error

PREDICTION_TYPES = ("epsilon", "v_prediction")

# On the 2-core CPU, chunks of 64 U-Net rows ran fastest for the tiny model (larger chunks spill
# caches; smaller ones pay per-call overhead). CUDA starts from the whole pass and halves on OOM.
CPU_DEFAULT_MAX_BATCH = 64


@dataclass
class DCInputs:
    """Validated engine inputs: images, and the noise, timestep and abar of every (image, j) pair."""

    x0: torch.Tensor  # (B, C, H, W)
    noise: torch.Tensor  # (B, T, C, H, W), possibly an expanded view
    timesteps: torch.Tensor  # (B, T) long
    abar: torch.Tensor  # (B, T) alphas_cumprod[timesteps] in x0's dtype
    prediction: str = "epsilon"  # the scheduler's prediction_type, one of PREDICTION_TYPES

    def x_t(self, b: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Noised inputs of rows (b, j): sqrt(abar) x0[b] + sqrt(1 - abar) eps[b, j]."""
        abar = self.abar[b, j].view(-1, 1, 1, 1)
        return abar.sqrt() * self.x0[b] + (1 - abar).sqrt() * self.noise[b, j]

    def target(self) -> torch.Tensor:
        """(B, T, C, H, W) what the model predicts: the noise itself (in place) or the velocity, once."""
        if self.prediction == "epsilon":
            return self.noise
        abar = self.abar.view(*self.abar.shape, 1, 1, 1)
        return abar.sqrt() * self.noise - (1 - abar).sqrt() * self.x0.unsqueeze(1)

    def target_rows(self, b: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """(rows, C, H, W) the target of rows (b, j) only (a chunk's share, with its own autograd graph)."""
        if self.prediction == "epsilon":
            return self.noise[b, j]
        abar = self.abar[b, j].view(-1, 1, 1, 1)
        return abar.sqrt() * self.noise[b, j] - (1 - abar).sqrt() * self.x0[b]

    @property
    def shape(self) -> Tuple[int, int]:
        return self.noise.shape[0], self.noise.shape[1]


def default_timesteps(num_train_timesteps: int, num_timesteps: int) -> torch.Tensor:
    """Diffusion Classifier's evenly strided timesteps: range(N//T//2, N, N//T), T of them."""
    if not 0 < num_timesteps <= num_train_timesteps:
        raise ValueError(f"num_timesteps must be in [1, {num_train_timesteps}], got {num_timesteps}")
    stride = num_train_timesteps // num_timesteps
    return torch.arange(stride // 2, num_train_timesteps, stride)[:num_timesteps]


def prediction_type(scheduler) -> str:
    """The scheduler's `prediction_type` ("epsilon" when its config has none); ValueError for others."""
    config = getattr(scheduler, "config", None)
    kind = (config.get("prediction_type", None) if hasattr(config, "get") else None) or "epsilon"
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"scheduler prediction_type {kind!r} is not supported; DC scores and the training losses "
                         f"support {' and '.join(PREDICTION_TYPES)} models (use an epsilon or v-prediction model)")
    return kind


def training_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the model learns to predict at (x0, eps, t): eps, or v = scheduler.get_velocity(x0, eps, t)."""
    if prediction_type(scheduler) == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    return noise


def _alphas_cumprod(scheduler) -> torch.Tensor:
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if not isinstance(alphas, torch.Tensor):
        raise TypeError(
            f"scheduler must have an `alphas_cumprod` tensor (a diffusers DDPM/DDIM-style scheduler); "
            f"{type(scheduler).__name__} has none"
        )
    return alphas


def prepare_inputs(unet, scheduler, x0: torch.Tensor, cond: torch.Tensor, *, timesteps=None, noise=None,
                   num_timesteps: int = 8, generator: Optional[torch.Generator] = None) -> DCInputs:
    """Check shapes, dtypes and devices; draw missing timesteps/noise. Shared by every engine."""
    if not isinstance(x0, torch.Tensor) or x0.dim() != 4:
        raise ValueError(f"x0 must be a (B, C, H, W) tensor, got {getattr(x0, 'shape', type(x0))}")
    if not isinstance(cond, torch.Tensor) or cond.dim() != 3:
        raise ValueError(f"cond must be a (K, L, D) tensor of encoder hidden states, got {getattr(cond, 'shape', type(cond))}")
    B, C, H, W = x0.shape
    K, _, D = cond.shape
    if K == 0 or B == 0:
        raise ValueError(f"need at least one image and one concept, got B={B} images and K={K} concepts")
    config = unet.config
    if C != config.in_channels:
        raise ValueError(f"x0 has {C} channels but the U-Net expects in_channels={config.in_channels}")
    if D != config.cross_attention_dim:
        raise ValueError(f"cond's last dim is {D} but the U-Net's cross_attention_dim is {config.cross_attention_dim}")
    if cond.device != x0.device or cond.dtype != x0.dtype:
        raise ValueError(f"cond ({cond.dtype}, {cond.device}) must match x0 ({x0.dtype}, {x0.device})")
    alphas = _alphas_cumprod(scheduler)
    num_train = alphas.shape[0]

    if timesteps is None:
        timesteps = default_timesteps(num_train, num_timesteps)
    timesteps = torch.as_tensor(timesteps)
    if timesteps.is_floating_point() or timesteps.dim() not in (1, 2):
        raise ValueError(f"timesteps must be an integer (T,) or (B, T) tensor, got {timesteps.dtype} {tuple(timesteps.shape)}")
    if timesteps.dim() == 2 and timesteps.shape[0] != B:
        raise ValueError(f"per-image timesteps must be (B, T) with B={B}, got {tuple(timesteps.shape)}")
    if timesteps.numel() and (timesteps.min() < 0 or timesteps.max() >= num_train):
        raise ValueError(f"timesteps must lie in [0, {num_train}), got [{timesteps.min()}, {timesteps.max()}]")
    timesteps = timesteps.to(x0.device, torch.long).expand(B, -1) if timesteps.dim() == 1 else timesteps.to(x0.device, torch.long)
    T = timesteps.shape[1]
    if T == 0:
        raise ValueError("need at least one timestep (T >= 1)")

    if noise is None:
        noise = torch.randn((B, T, C, H, W), generator=generator, device=x0.device, dtype=x0.dtype)
    elif not isinstance(noise, torch.Tensor) or noise.shape not in ((B, T, C, H, W), (T, C, H, W)):
        raise ValueError(f"noise must be (B, T, C, H, W) = {(B, T, C, H, W)} or shared (T, C, H, W), "
                         f"got {tuple(getattr(noise, 'shape', ()))}")
    elif noise.dtype != x0.dtype or noise.device != x0.device:
        raise ValueError(f"noise ({noise.dtype}, {noise.device}) must match x0 ({x0.dtype}, {x0.device})")
    noise = noise.expand(B, T, C, H, W)

    abar = alphas.to(x0.device)[timesteps].to(x0.dtype)
    return DCInputs(x0=x0, noise=noise, timesteps=timesteps, abar=abar, prediction=prediction_type(scheduler))


def _check_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


def _row_batches(B: int, K: int, T: int, max_batch: int, device: torch.device):
    """Yield (b, k, j) index tensors for consecutive chunks of the image-major row order."""
    rows = torch.arange(B * K * T, device=device)
    for start in range(0, B * K * T, max_batch):
        r = rows[start:start + max_batch]
        yield r // (K * T), (r // T) % K, r % T


def _unet_rows(unet, inputs: DCInputs, cond: torch.Tensor, b, k, j) -> torch.Tensor:
    """U-Net noise predictions (rows, C, H, W) for the given rows, in the U-Net's dtype and memory format."""
    return unet(inputs.x_t(b, j), inputs.timesteps[b, j], encoder_hidden_states=cond.index_select(0, k),
                return_dict=False)[0]


def _as_rows(out: torch.Tensor, dtype: torch.dtype, into: Optional[torch.Tensor] = None) -> torch.Tensor:
    """U-Net output (rows, C, H, W) as contiguous (rows, C*H*W) rows in `dtype`, with at most one copy.

    Under autocast the U-Net returns bf16/fp16 while the noise is fp32, and a channels_last U-Net returns
    channels_last tensors (no `.view` of those): one `copy_` converts dtype and layout together, into
    `into` when given (a slice of the engine's preallocated buffer). No copy at all when the output is
    already contiguous in `dtype` and no buffer is given. Differentiable (copy_ records the graph).
    """
    rows = out.shape[0]
    if into is None:
        if out.dtype == dtype and out.is_contiguous():
            return out.view(rows, -1)
        into = torch.empty((rows, out[0].numel()), device=out.device, dtype=dtype)
    into.view(out.shape).copy_(out)
    return into


def _resolve_max_batch(max_batch: Optional[int], total: int, device: torch.device) -> int:
    if max_batch is not None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        return max_batch
    return min(total, CPU_DEFAULT_MAX_BATCH) if device.type == "cpu" else total


def _with_oom_retry(run: Callable[[int], torch.Tensor], max_batch: int, explicit: bool) -> torch.Tensor:
    """Run with chunks of max_batch rows; when the size was not given, halve it on CUDA OOM."""
    while True:
        try:
            return run(max_batch)
        except torch.OutOfMemoryError:
            if explicit or max_batch == 1:
                raise
            max_batch //= 2
            torch.cuda.empty_cache()


def dc_scores(unet, scheduler, x0: torch.Tensor, cond: torch.Tensor, *, timesteps=None, noise=None,
              num_timesteps: int = 8, generator: Optional[torch.Generator] = None, loss: str = "l2",
              max_batch: Optional[int] = None, huber_delta: float = 1.0) -> torch.Tensor:
    """DC errors err (B, K, T) of every image under every concept, in one chunked batched U-Net pass.

    Args:
        unet: a diffusers UNet2DConditionModel (peft-LoRA-wrapped or not).
        scheduler: any scheduler with `alphas_cumprod` (DDPM, DDIM, ...).
        x0: (B, C, H, W) clean latents (or pixels for a VAE-less model).
        cond: (K, L, D) encoder hidden states, one per concept.
        timesteps: (T,) shared by all images or (B, T); default: T=num_timesteps evenly strided.
        noise: (B, T, C, H, W) or (T, C, H, W) shared by all images; default: drawn from `generator`.
        loss: 'l2' (default), 'l1' or 'huber' (with `huber_delta`).
        max_batch: U-Net rows per call; default 64 on CPU, the whole pass on CUDA (halved on OOM).

    Differentiable when grad is enabled (the graph spans all chunks; see `dc_loss_backward` for the
    memory-bounded gradient).
    """
    _check_loss(loss)
    inputs = prepare_inputs(unet, scheduler, x0, cond, timesteps=timesteps, noise=noise,
                            num_timesteps=num_timesteps, generator=generator)
    return _errors(unet, inputs, cond, loss, max_batch, huber_delta)


def _errors(unet, inputs: DCInputs, cond: torch.Tensor, loss: str, max_batch: Optional[int],
            huber_delta: float) -> torch.Tensor:
    B, T = inputs.shape
    K = cond.shape[0]
    device = inputs.x0.device
    target = inputs.target().reshape(B, T, -1)  # (B, T, D), shared by the K concepts: no K-fold copy

    def run(chunk: int) -> torch.Tensor:
        # Compare in the noise's dtype. Each chunk's output is written once into one preallocated buffer
        # (dtype and layout converted in that copy) that the fused kernel then reads once: no torch.cat
        # followed by a second full copy for the cast.
        dtype, total = inputs.noise.dtype, B * K * T
        if chunk >= total:
            b, k, j = next(_row_batches(B, K, T, total, device))
            pred = _as_rows(_unet_rows(unet, inputs, cond, b, k, j), dtype)
        else:
            pred = None
            for start, (b, k, j) in zip(range(0, total, chunk), _row_batches(B, K, T, chunk, device)):
                out = _unet_rows(unet, inputs, cond, b, k, j)
                if pred is None:
                    pred = torch.empty((total, out[0].numel()), device=device, dtype=dtype)
                _as_rows(out, dtype, pred[start:start + out.shape[0]])
        return dc_error(pred.view(B, K, T, -1), target, loss, huber_delta)

    return _with_oom_retry(run, _resolve_max_batch(max_batch, B * K * T, device), max_batch is not None)


def dc_logits(err: torch.Tensor, temperature: float = 1.0, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DC logits (B, K) = -(1/T) sum_j w_j err[b,k,j] / temperature; softmax over K gives p(c_k | x0)."""
    if err.dim() != 3:
        raise ValueError(f"err must be (B, K, T), got {tuple(err.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    B, _, T = err.shape
    if weights is None:
        return -err.mean(-1) / temperature
    weights = torch.as_tensor(weights, dtype=err.dtype, device=err.device)
    if weights.shape not in ((T,), (B, T)):
        raise ValueError(f"weights must be (T,) = ({T},) or (B, T) = ({B}, {T}), got {tuple(weights.shape)}")
    weights = weights.view(-1, 1, T) if weights.dim() == 2 else weights.view(1, 1, T)
    return -(err * weights).sum(-1) / (T * temperature)


def dc_loss_backward(unet, scheduler, x0: torch.Tensor, cond: torch.Tensor,
                     loss_fn: Callable[[torch.Tensor], torch.Tensor], *, timesteps=None, noise=None,
                     num_timesteps: int = 8, generator: Optional[torch.Generator] = None, loss: str = "l2",
                     max_batch: Optional[int] = None, huber_delta: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Backpropagate `loss_fn(err)` at the memory of one chunk, with the unchunked pass's gradients.

    The softmax over concepts couples all K*T errors of an image, so chunks cannot be backpropagated
    independently with their own loss. Two passes instead (DESIGN 2.2):
      (a) every chunk's errors without grad -> err; loss_fn(err).backward() gives dL/d err;
      (b) per chunk, recompute the U-Net rows with grad and backpropagate dL/d err of those rows.
    Gradients accumulate into `.grad` of the U-Net's parameters (and of x0/cond when they require
    grad; their upstream graphs are traversed once, after the last chunk).
    Returns (loss, err), both detached.
    """
    _check_loss(loss)
    x0_leaf = x0.detach().requires_grad_(x0.requires_grad)
    cond_leaf = cond.detach().requires_grad_(cond.requires_grad)
    inputs = prepare_inputs(unet, scheduler, x0_leaf, cond_leaf, timesteps=timesteps, noise=noise,
                            num_timesteps=num_timesteps, generator=generator)
    with torch.no_grad():
        err = _errors(unet, inputs, cond_leaf, loss, max_batch, huber_delta)
    err = err.requires_grad_(True)
    with torch.enable_grad():
        value = loss_fn(err)
        if value.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar, got shape {tuple(value.shape)}")
        (grad_err,) = torch.autograd.grad(value, err)

    B, T = inputs.shape
    K = cond.shape[0]
    chunk = _resolve_max_batch(max_batch, B * K * T, x0.device)
    with torch.enable_grad():
        for b, k, j in _row_batches(B, K, T, chunk, x0.device):
            pred = _as_rows(_unet_rows(unet, inputs, cond_leaf, b, k, j), inputs.noise.dtype)
            rows = pred.shape[0]
            target = inputs.target_rows(b, j).reshape(1, rows, -1)  # per chunk: its graph to x0 is the chunk's own
            chunk_err = dc_error(pred.view(1, 1, rows, -1), target, loss, huber_delta)
            chunk_err.backward(grad_err[b, k, j].view(1, 1, rows))
    if x0.requires_grad:
        x0.backward(x0_leaf.grad)
    if cond.requires_grad:
        cond.backward(cond_leaf.grad)
    return value.detach(), err.detach()
