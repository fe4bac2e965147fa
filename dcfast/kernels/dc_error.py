"""Triton backend of `dcfast::dc_error` (docs/design.md: the DC error kernel), registered as the CUDA kernel by
`dcfast/ops/dc_error.py` when no CUDA C++ kernel was built. Runs on CPU tensors under
TRITON_INTERPRET=1 (fp32/fp16 only: the interpreter computes bf16 wrongly).

Layout: pred is viewed as R = B*K*T rows of D values; row r = (b*K + k)*T + t pairs with noise row
b*T + t, so the noise is read in place for every concept k and never repeated K times.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dcfast.kernels._launch import device_guard

_LOSS_CODE = {"l2": 0, "l1": 1, "huber": 2}
_MAX_TILE = 1024  # elements per program tile (BLOCK_R * BLOCK_D): 4 warps x 8 fp32 registers x 32 lanes


@triton.jit
def _loss_value(d, delta, LOSS: tl.constexpr):
    """Elementwise loss of d = noise - pred: d^2 (l2), |d| (l1), huber_delta(d) (huber)."""
    if LOSS == 0:
        out = d * d
    elif LOSS == 1:
        out = tl.abs(d)
    else:
        a = tl.abs(d)
        out = tl.where(a < delta, 0.5 * d * d, delta * (a - 0.5 * delta))
    return out


@triton.jit
def _loss_grad_pred(d, delta, LOSS: tl.constexpr):
    """d loss / d pred with d = noise - pred (hence the minus): -2d, -sign(d), -clamp(d, -delta, delta)."""
    if LOSS == 0:
        out = -2.0 * d
    elif LOSS == 1:
        out = tl.where(d > 0, -1.0, tl.where(d < 0, 1.0, 0.0))
    else:
        out = -tl.minimum(tl.maximum(d, -delta), delta)
    return out


@triton.jit
def _dc_error_fwd(pred_ptr, noise_ptr, err_ptr, n_rows, KT, T, D, delta,
                  LOSS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """err[r] = (1/D) sum_d loss(noise[(r // KT)*T + r % T, d] - pred[r, d]) for BLOCK_R rows r.

    The D axis is walked in BLOCK_D chunks into an fp32 (BLOCK_R, BLOCK_D) accumulator that is
    reduced once at the end. Masked lanes load pred = noise = 0, so d = 0 and add 0 for every loss.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    noise_rows = (rows // KT) * T + rows % T
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < D)[None, :]
        p = tl.load(pred_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        n = tl.load(noise_ptr + noise_rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += _loss_value(n - p, delta, LOSS)
    tl.store(err_ptr + rows, tl.sum(acc, axis=1) / D, mask=row_ok)


@triton.jit
def _dc_error_bwd(grad_err_ptr, pred_ptr, noise_ptr, grad_pred_ptr, n_rows, KT, T, D, delta,
                  LOSS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad_pred[r, d] = grad_err[r] / D * dloss/dpred(noise[(r // KT)*T + r % T, d] - pred[r, d]).

    No reduction here, so each program owns one (BLOCK_R, BLOCK_D) tile and the grid covers D
    (axis 1) as well as the rows: more programs in flight than a loop over D per row would give.
    The broadcast difference is recomputed in registers and never written to memory.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < D)[None, :]
    noise_rows = (rows // KT) * T + rows % T
    p = tl.load(pred_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    n = tl.load(noise_ptr + noise_rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(grad_err_ptr + rows, mask=row_ok, other=0.0) / D
    grad = _loss_grad_pred(n - p, delta, LOSS) * scale[:, None]
    tl.store(grad_pred_ptr + rows[:, None] * D + cols[None, :], grad.to(grad_pred_ptr.dtype.element_ty), mask=mask)


def _check(pred: torch.Tensor, noise: torch.Tensor, loss: str) -> None:
    """The launchers index raw pointers, so shapes are checked here too (the op may be called directly)."""
    if loss not in _LOSS_CODE:
        raise ValueError(f"dcfast.dc_error: loss must be one of {tuple(_LOSS_CODE)}, got {loss!r}")
    if pred.dim() != 4 or noise.dim() != 3 or tuple(noise.shape) != (pred.shape[0], pred.shape[2], pred.shape[3]):
        raise ValueError(
            f"dcfast.dc_error: pred must be (B, K, T, D) and noise (B, T, D); got pred {tuple(pred.shape)}, "
            f"noise {tuple(noise.shape)}"
        )
    if pred.device != noise.device:
        raise ValueError(f"dcfast.dc_error: pred and noise must be on one device, got {pred.device} and {noise.device}")
    if pred.dtype != noise.dtype or pred.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"dcfast.dc_error: pred and noise must share a float32/16 or bfloat16 dtype, got "
                        f"{pred.dtype} and {noise.dtype}")


def _blocks(n_rows: int, D: int):
    """Tile (BLOCK_R, BLOCK_D): long rows get a wide D chunk; short rows are stacked BLOCK_R at a time."""
    block_d = min(triton.next_power_of_2(max(D, 1)), _MAX_TILE)
    block_r = min(triton.next_power_of_2(max(n_rows, 1)), max(1, _MAX_TILE // block_d))
    return block_r, block_d


def dc_error_forward(pred: torch.Tensor, noise: torch.Tensor, loss: str, huber_delta: float) -> torch.Tensor:
    """pred (B, K, T, D), noise (B, T, D) -> err (B, K, T) float32."""
    _check(pred, noise, loss)
    B, K, T, D = pred.shape
    pred, noise = pred.contiguous(), noise.contiguous()
    err = torch.empty((B, K, T), device=pred.device, dtype=torch.float32)
    n_rows = B * K * T
    if n_rows == 0:
        return err
    block_r, block_d = _blocks(n_rows, D)
    with device_guard(pred):
        _dc_error_fwd[(triton.cdiv(n_rows, block_r),)](
            pred, noise, err, n_rows, K * T, T, D, float(huber_delta),
            LOSS=_LOSS_CODE[loss], BLOCK_R=block_r, BLOCK_D=block_d,
        )
    return err


def dc_error_backward(grad_err: torch.Tensor, pred: torch.Tensor, noise: torch.Tensor, loss: str,
                      huber_delta: float) -> torch.Tensor:
    """grad_err (B, K, T) -> grad_pred (B, K, T, D) in pred's dtype: grad_err * dloss/dpred / D."""
    _check(pred, noise, loss)
    if tuple(grad_err.shape) != tuple(pred.shape[:3]):
        raise ValueError(f"dcfast.dc_error_backward: grad_err must be (B, K, T) = {tuple(pred.shape[:3])}, "
                         f"got {tuple(grad_err.shape)}")
    B, K, T, D = pred.shape
    pred, noise = pred.contiguous(), noise.contiguous()
    grad_err = grad_err.to(torch.float32).contiguous()
    grad_pred = torch.empty_like(pred)
    n_rows = B * K * T
    if n_rows == 0 or D == 0:
        return grad_pred
    block_r, block_d = _blocks(n_rows, D)
    with device_guard(pred):
        _dc_error_bwd[(triton.cdiv(n_rows, block_r), triton.cdiv(D, block_d))](
            grad_err, pred, noise, grad_pred, n_rows, K * T, T, D, float(huber_delta),
            LOSS=_LOSS_CODE[loss], BLOCK_R=block_r, BLOCK_D=block_d,
        )
    return grad_pred
