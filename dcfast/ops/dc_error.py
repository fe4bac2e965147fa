"""Fused DC error reduction (docs/design.md: the DC error kernel): the Python face of `dcfast::dc_error`.

    err[b, k, t] = mean_d loss(noise[b, t, d] - pred[b, k, t, d])

`pred` holds the U-Net outputs of B images x K concepts x T (timestep, noise) pairs; `noise` holds
the B x T noises shared by every concept and is read in place, never repeated K times. The backward
writes `grad_err[b,k,t] * d loss / d pred / D` directly, without materialising the broadcast
difference. Errors are float32 whatever the input dtype; the input gradient has the input's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dcfast import _backend

LOSSES = ("l2", "l1", "huber")
OP = "dc_error"


def dc_error_reference(pred: torch.Tensor, noise: torch.Tensor, loss: str = "l2", huber_delta: float = 1.0) -> torch.Tensor:
    """Plain-torch reference: pred (B, K, T, D), noise (B, T, D) -> err (B, K, T) float32."""
    target = noise.unsqueeze(1).float().expand_as(pred)
    if loss == "l2":
        per_element = F.mse_loss(pred.float(), target, reduction="none")
    elif loss == "l1":
        per_element = F.l1_loss(pred.float(), target, reduction="none")
    else:
        per_element = F.huber_loss(pred.float(), target, reduction="none", delta=huber_delta)
    return per_element.mean(-1)


def _check(pred: torch.Tensor, noise: torch.Tensor, loss: str, huber_delta: float) -> None:
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if loss == "huber" and not huber_delta > 0:
        raise ValueError(f"huber_delta must be > 0, got {huber_delta}")
    if pred.dim() != 4 or noise.dim() != 3:
        raise ValueError(
            f"pred must be (B, K, T, D) and noise (B, T, D); got pred {tuple(pred.shape)}, noise {tuple(noise.shape)}"
        )
    b, _, t, d = pred.shape
    if tuple(noise.shape) != (b, t, d):
        raise ValueError(f"noise must be (B, T, D) = {(b, t, d)} to match pred {tuple(pred.shape)}, got {tuple(noise.shape)}")
    if pred.dtype != noise.dtype:
        raise TypeError(f"pred and noise must share a dtype, got {pred.dtype} and {noise.dtype}")
    if pred.device != noise.device:
        raise ValueError(f"pred and noise must be on one device, got {pred.device} and {noise.device}")
    if not pred.is_floating_point():
        raise TypeError(f"pred must be a floating-point tensor, got {pred.dtype}")


# The CUDA kernels (CUDA C++ and Triton) take these; float64 on CUDA runs the reference instead. The C++
# CPU kernel takes float64 as well.
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@torch.compiler.assume_constant_result  # a dispatcher query dynamo cannot trace; fixed once dcfast is imported
def _has_kernel(device_type: str) -> bool:
    return _backend.has_kernel(OP, "CPU" if device_type == "cpu" else "CUDA")


def _uses_op(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether pred of this device and dtype goes to the compiled op (else the torch reference)."""
    if device.type != "cpu" and dtype not in CUDA_DTYPES:
        return False
    return _has_kernel(device.type)


def dc_error(pred: torch.Tensor, noise: torch.Tensor, loss: str = "l2", huber_delta: float = 1.0) -> torch.Tensor:
    """DC errors of pred (B, K, T, D) against noise (B, T, D) -> (B, K, T) float32, differentiable.

    Runs the compiled kernel of pred's device when there is one (C++ on CPU; CUDA C++ or Triton on
    CUDA, float32/16 and bfloat16), else the torch reference (float64 on CUDA, for one).
    """
    _check(pred, noise, loss, huber_delta)
    if _uses_op(pred.device, pred.dtype):
        return torch.ops.dcfast.dc_error(pred, noise, loss, float(huber_delta))
    if not torch.compiler.is_compiling():  # warnings.warn would break a fullgraph trace
        _backend.warn_if_reference_only()
    return dc_error_reference(pred, noise, loss, huber_delta)


def _setup_context(ctx, inputs, output):
    pred, noise, loss, huber_delta = inputs
    ctx.save_for_backward(pred, noise)
    ctx.loss, ctx.huber_delta = loss, huber_delta


def _backward(ctx, grad_err):
    pred, noise = ctx.saved_tensors
    grad_pred = torch.ops.dcfast.dc_error_backward(grad_err, pred, noise, ctx.loss, ctx.huber_delta)
    grad_noise = -grad_pred.sum(1) if ctx.needs_input_grad[1] else None
    return (grad_pred if ctx.needs_input_grad[0] else None), grad_noise, None, None


def _register() -> None:
    """Fake impls, autograd, and the Triton kernel for CUDA when no CUDA C++ kernel was built."""
    if not _backend.extension_loaded():
        return

    @torch.library.register_fake(f"dcfast::{OP}")
    def _(pred, noise, loss, huber_delta):
        return pred.new_empty(pred.shape[:3], dtype=torch.float32)

    @torch.library.register_fake(f"dcfast::{OP}_backward")
    def _(grad_err, pred, noise, loss, huber_delta):
        return torch.empty_like(pred)

    torch.library.register_autograd(f"dcfast::{OP}", _backward, setup_context=_setup_context)

    if torch.cuda.is_available() and not _backend.has_kernel(OP, "CUDA") and _backend.triton_available():
        from dcfast.kernels import dc_error as triton_dc_error

        torch.library.impl(f"dcfast::{OP}", "CUDA")(triton_dc_error.dc_error_forward)
        torch.library.impl(f"dcfast::{OP}_backward", "CUDA")(triton_dc_error.dc_error_backward)


_register()
