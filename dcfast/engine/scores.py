"""The DC score engine's public API: all B*K*T U-Net evaluations of a batch in one chunked pass.

For images x0 (B, C, H, W), concept conditions cond (K, L, D) and T (timestep, noise) pairs shared by
every concept,

    x_t[b,j]   = sqrt(abar[t_j]) x0[b] + sqrt(1 - abar[t_j]) eps[b,j]
    err[b,k,j] = mean_{C,H,W} loss(target[b,j] - model_theta(x_t[b,j], cond[k], t_j))

The target is the scheduler's `prediction_type`: eps[b,j] for "epsilon", the velocity
v[b,j] = sqrt(abar[t_j]) eps[b,j] - sqrt(1 - abar[t_j]) x0[b] for "v_prediction" (computed once per
(b, j), never per concept); "sample" models are refused.

The U-Net sees rows ordered (b, k, j), image-major, so a module hook sees each image's K*T rows
together (what dcfast.FisherAccumulator relies on). The target is never repeated K times: the fused
`dc_error` op reads it in place. Inputs and targets: `dcfast.engine.targets`; chunks and their autotuned
size: `dcfast.engine.chunks`; the shared-work U-Net pass: `dcfast.engine.unet_pass`.
"""
from __future__ import annotations

from typing import Callable, FrozenSet, Optional, Sequence, Tuple

import torch

from dcfast.engine.chunks import Chunk, chunk_rows, plan_chunks
from dcfast.engine.targets import DCInputs, prepare_inputs
from dcfast.engine.unet_pass import forward_rows, usable_shares
from dcfast.ops.dc_error import LOSSES, dc_error

# The exact work shared across concepts by default (dcfast.engine.unet_pass), each kept where it paid on the 2-core CPU
# (benchmarks/RESULTS.md): "prefix" and "kv" did at every size; "temb" (0.03% of the tiny U-Net's FLOPs) measured
# within the noise, so it is available (share=...) but not on by default.
DEFAULT_SHARES = frozenset({"prefix", "kv"})


def _check_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


# ------------------------------------------------------------------------------------------------------
# One chunk.
# ------------------------------------------------------------------------------------------------------

def _pair_inputs(inputs: DCInputs, chunk: Chunk) -> Tuple[torch.Tensor, torch.Tensor]:
    """x_t (pairs, C, H, W) and t (pairs,) of the chunk's pairs (b, j), b-major."""
    bs, _, js = chunk.index
    abar = inputs.abar[bs, js]
    scale = abar.view(*abar.shape, 1, 1, 1)
    x_t = scale.sqrt() * inputs.x0[bs].unsqueeze(1) + (1 - scale).sqrt() * inputs.noise[bs, js]
    return x_t.reshape(-1, *inputs.x0.shape[1:]), inputs.timesteps[bs, js].reshape(-1)


def _pair_target(inputs: DCInputs, chunk: Chunk) -> torch.Tensor:
    """(nb, nt, C*H*W) what the model predicts at the chunk's pairs: the noise, or the velocity."""
    bs, _, js = chunk.index
    noise = inputs.noise[bs, js]
    if inputs.prediction == "epsilon":
        return noise.reshape(noise.shape[0], noise.shape[1], -1)
    abar = inputs.abar[bs, js]
    scale = abar.view(*abar.shape, 1, 1, 1)
    target = scale.sqrt() * noise - (1 - scale).sqrt() * inputs.x0[bs].unsqueeze(1)
    return target.reshape(target.shape[0], target.shape[1], -1)


def _chunk_predictions(unet, inputs: DCInputs, cond: torch.Tensor, chunk: Chunk, shares: FrozenSet[str]) -> torch.Tensor:
    """The chunk's U-Net outputs as (nb, nk, nt, C*H*W) in the noise's dtype."""
    x_pairs, t_pairs = _pair_inputs(inputs, chunk)
    layout = chunk.layout
    images, concepts, _ = chunk.index
    out = forward_rows(unet, x_pairs, t_pairs, cond[concepts], layout, shares,
                       inputs.added_cond_kwargs(images, concepts))
    return _as_rows(out, inputs.noise.dtype).view(layout.nb, layout.nk, layout.nt, -1)


def _as_rows(out: torch.Tensor, dtype: torch.dtype, into: Optional[torch.Tensor] = None) -> torch.Tensor:
    """U-Net output (rows, C, H, W) as contiguous (rows, C*H*W) rows in `dtype`, with at most one copy.

    Under autocast the U-Net returns bf16/fp16 while the noise is fp32, and a channels_last U-Net returns
    channels_last tensors (no `.view` of those): one `copy_` converts dtype and layout together. No copy
    at all when the output is already contiguous in `dtype`. Differentiable (copy_ records the graph).
    """
    rows = out.shape[0]
    if into is None:
        if out.dtype == dtype and out.is_contiguous():
            return out.view(rows, -1)
        into = torch.empty((rows, out[0].numel()), device=out.device, dtype=dtype)
    into.view(out.shape).copy_(out)
    return into


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


def _requested(share) -> FrozenSet[str]:
    if share is None:
        return DEFAULT_SHARES
    if isinstance(share, str):
        share = (share,)
    return frozenset(share)


def dc_scores(unet, scheduler, x0: torch.Tensor, cond: torch.Tensor, *, timesteps=None, noise=None,
              num_timesteps: int = 8, generator: Optional[torch.Generator] = None, loss: str = "l2",
              max_batch: Optional[int] = None, huber_delta: float = 1.0, share=None,
              added_cond_kwargs: Optional[dict] = None, checkpoint: bool = False) -> torch.Tensor:
    """DC errors err (B, K, T) of every image under every concept, in one chunked batched U-Net pass.

    Args:
        unet: a diffusers UNet2DConditionModel (peft-LoRA-wrapped or not).
        scheduler: any scheduler with `alphas_cumprod` (DDPM, DDIM, ...).
        x0: (B, C, H, W) clean latents (or pixels for a VAE-less model).
        cond: (K, L, D) encoder hidden states, one per concept.
        timesteps: (T,) shared by all images or (B, T); default: T=num_timesteps evenly strided.
        noise: (B, T, C, H, W) or (T, C, H, W) shared by all images; default: drawn from `generator`.
        loss: 'l2' (default), 'l1' or 'huber' (with `huber_delta`).
        max_batch: U-Net rows per call (the override); default on CPU: autotuned once per U-Net config,
            row shape, device, dtype and thread count (`dcfast.engine.chunks.chunk_tuner`); on CUDA the whole pass (halved on OOM).
        share: exact work done once instead of once per concept, a subset of ("prefix", "kv", "temb")
            (`dcfast.engine.unet_pass`); None: DEFAULT_SHARES; (): the plain U-Net call on every row.
        added_cond_kwargs: an SDXL U-Net's added conditions, {"text_embeds": (K, P) each concept's pooled text
            embedding, "time_ids": (B, 6) each image's size and crop, or (6,) for all}; None for SD 1.x/2.x.
        checkpoint: under grad, keep no chunk's U-Net activations: each chunk is recomputed in the backward
            (torch.utils.checkpoint), so `loss(err).backward()` peaks at one chunk's activations (`max_batch`
            rows; pin it) for one more forward. The same values and gradients.

    Differentiable when grad is enabled (the graph spans all chunks; `checkpoint`, or `dc_loss_backward`, bounds
    its memory).
    """
    _check_loss(loss)
    inputs = prepare_inputs(unet, scheduler, x0, cond, timesteps=timesteps, noise=noise,
                            num_timesteps=num_timesteps, generator=generator, added_cond_kwargs=added_cond_kwargs)
    return _errors(unet, inputs, cond, loss, max_batch, huber_delta, share, checkpoint=checkpoint)


def dc_scores_with_predictions(unet, scheduler, x0: torch.Tensor, cond: torch.Tensor, concepts: Sequence[int] = (0,),
                               *, timesteps=None, noise=None, num_timesteps: int = 8,
                               generator: Optional[torch.Generator] = None, loss: str = "l2",
                               max_batch: Optional[int] = None, huber_delta: float = 1.0,
                               share=None, added_cond_kwargs: Optional[dict] = None,
                               checkpoint: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """`dc_scores` plus the pass's own U-Net outputs under `concepts` (indices into cond), no extra U-Net call.

    Returns (err (B, K, T), predictions (B, len(concepts), T, C, H, W) in the noise's dtype): predictions[b, i, j]
    is the model's output at (x_t[b, j], cond[concepts[i]], t[b, j]), what a separate call on those rows gives.
    Differentiable like `dc_scores` (EWC-DC's denoising loss and DSC's noise distillation read them); `checkpoint`
    as there.
    """
    _check_loss(loss)
    inputs = prepare_inputs(unet, scheduler, x0, cond, timesteps=timesteps, noise=noise,
                            num_timesteps=num_timesteps, generator=generator, added_cond_kwargs=added_cond_kwargs)
    concepts = [int(k) for k in concepts]
    if any(not 0 <= k < cond.shape[0] for k in concepts):
        raise ValueError(f"concepts must index cond's {cond.shape[0]} conditions, got {concepts}")
    err, kept = _errors(unet, inputs, cond, loss, max_batch, huber_delta, share, keep=concepts, checkpoint=checkpoint)
    B, T = inputs.shape
    return err, kept.view(B, len(concepts), T, *x0.shape[1:])


def _chunk_errors(unet, inputs: DCInputs, cond: torch.Tensor, chunk: Chunk, shares: FrozenSet[str], loss: str,
                  huber_delta: float, concepts: Sequence[int]) -> Tuple[torch.Tensor, ...]:
    """(the chunk's errors (nb, nk, nt), then its predictions (nb, nt, C*H*W) under each of `concepts`)."""
    pred = _chunk_predictions(unet, inputs, cond, chunk, shares)
    err = dc_error(pred, _pair_target(inputs, chunk), loss, huber_delta)
    return (err,) + tuple(pred[:, k - chunk.k0] for k in concepts)


def _errors(unet, inputs: DCInputs, cond: torch.Tensor, loss: str, max_batch: Optional[int],
            huber_delta: float, share=None, keep: Sequence[int] = (), checkpoint: bool = False):
    """err (B, K, T); with `keep`, (err, the predictions of those concepts (B, len(keep), T, C*H*W)).

    `checkpoint` (under grad): each chunk's U-Net activations are dropped after its forward and recomputed in the
    backward (torch.utils.checkpoint), so the backward of the whole pass peaks at one chunk's activations.
    """
    B, T = inputs.shape
    K = cond.shape[0]
    shares = usable_shares(unet, _requested(share))
    bounded = checkpoint and torch.is_grad_enabled()

    def run(rows: int):
        # Each chunk's errors go straight from its predictions (read once by the fused kernel, the target
        # read in place for all concepts) into err: no buffer of all predictions, no torch.cat.
        err = torch.empty((B, K, T), device=inputs.x0.device, dtype=torch.float32)
        kept = None
        for chunk in plan_chunks(B, K, T, lambda: rows):
            slots = [(slot, k) for slot, k in enumerate(keep) if chunk.k0 <= k < chunk.k1]
            args = (unet, inputs, cond, chunk, shares, loss, huber_delta, [k for _, k in slots])
            out = (torch.utils.checkpoint.checkpoint(_chunk_errors, *args, use_reentrant=False) if bounded
                   else _chunk_errors(*args))
            err[chunk.index] = out[0]
            for (slot, _), rows_k in zip(slots, out[1:]):
                if kept is None:
                    kept = rows_k.new_empty((B, len(keep), T, rows_k.shape[-1]))
                kept[chunk.b0:chunk.b1, slot, chunk.j0:chunk.j1] = rows_k
        return (err, kept) if keep else err

    def tuned_rows() -> int:
        return chunk_rows(unet, inputs, cond, max_batch, shares,
                          lambda chunk: _chunk_predictions(unet, inputs, cond, chunk, shares))

    explicit = max_batch is not None or inputs.x0.device.type == "cpu"  # OOM halving: CUDA's default only
    if torch.is_grad_enabled():
        return _with_oom_retry(run, tuned_rows(), explicit)
    with torch.inference_mode():  # as fast as no_grad gets; results are cloned out of inference mode below
        out = _with_oom_retry(run, tuned_rows(), explicit)
    return tuple(t.clone() for t in out) if keep else out.clone()


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
                     max_batch: Optional[int] = None, huber_delta: float = 1.0,
                     share=None, added_cond_kwargs: Optional[dict] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Backpropagate `loss_fn(err)` at the memory of one chunk, with the unchunked pass's gradients.

    The softmax over concepts couples all K*T errors of an image, so chunks cannot be backpropagated
    independently with their own loss. Two passes instead (docs/design.md: the memory-bounded DC gradient):
      (a) every chunk's errors without grad -> err; loss_fn(err).backward() gives dL/d err;
      (b) per chunk, recompute the U-Net rows with grad and backpropagate dL/d err of those rows.
    Gradients accumulate into `.grad` of the U-Net's parameters (and of x0, cond and SDXL's text_embeds when
    they require grad; their upstream graphs are traversed once, after the last chunk). `max_batch`, `share` and
    `added_cond_kwargs` as in `dc_scores` (every share recomputes per chunk, so each chunk's graph is its own).
    Returns (loss, err), both detached.
    """
    _check_loss(loss)
    inputs_given = {"x0": x0, "cond": cond}
    if added_cond_kwargs and isinstance(added_cond_kwargs.get("text_embeds"), torch.Tensor):
        inputs_given["text_embeds"] = added_cond_kwargs["text_embeds"]
    leaves = {name: t.detach().requires_grad_(t.requires_grad) for name, t in inputs_given.items()}
    x0_leaf, cond_leaf = leaves["x0"], leaves["cond"]
    added_leaves = dict(added_cond_kwargs, text_embeds=leaves["text_embeds"]) if "text_embeds" in leaves \
        else added_cond_kwargs
    inputs = prepare_inputs(unet, scheduler, x0_leaf, cond_leaf, timesteps=timesteps, noise=noise,
                            num_timesteps=num_timesteps, generator=generator, added_cond_kwargs=added_leaves)
    with torch.no_grad():
        err = _errors(unet, inputs, cond_leaf, loss, max_batch, huber_delta, share)
    err = err.requires_grad_(True)
    with torch.enable_grad():
        value = loss_fn(err)
        if value.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar, got shape {tuple(value.shape)}")
        (grad_err,) = torch.autograd.grad(value, err)

    B, T = inputs.shape
    K = cond.shape[0]
    with torch.enable_grad():
        shares = usable_shares(unet, _requested(share))
        rows = chunk_rows(unet, inputs, cond_leaf, max_batch, shares,
                          lambda chunk: _chunk_predictions(unet, inputs, cond_leaf, chunk, shares))
        for chunk in plan_chunks(B, K, T, lambda: rows):
            pred = _chunk_predictions(unet, inputs, cond_leaf, chunk, shares)
            target = _pair_target(inputs, chunk)  # per chunk: its graph to x0 is the chunk's own
            dc_error(pred, target, loss, huber_delta).backward(grad_err[chunk.index])
    given = [(t, leaves[name].grad) for name, t in inputs_given.items() if t.requires_grad]
    if given:  # one traversal of the shared upstream graph (a text encoder feeds both cond and text_embeds)
        torch.autograd.backward([t for t, _ in given],
                                [g if g is not None else torch.zeros_like(t) for t, g in given])
    return value.detach(), err.detach()
