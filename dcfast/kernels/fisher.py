"""Triton kernel of `dcfast::fisher_accumulate_` (DESIGN 2.3), registered for CUDA by dcfast.ops.fisher.

    fisher[o, i] += sum_n ( sum_r grad_output[n, r, o] * input[n, r, i] )^2

Runs on CUDA devices, and on CPU tensors under TRITON_INTERPRET=1 (float32/float16 only there: the
interpreter computes bfloat16 wrongly and silently).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _fisher_fwd(
    fisher_ptr, grad_ptr, input_ptr,
    N, R, O, I,
    stride_gn, stride_gr, stride_go,
    stride_xn, stride_xr, stride_xi,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr, ATOMIC: tl.constexpr,
):
    """One program: a BLOCK_O x BLOCK_I tile of fisher over the samples of split `program_id(2)`.

    Per sample the tile of G_n^T X_n is built in registers from BLOCK_R-row slabs (tl.dot, fp32
    accumulation, IEEE fp32 products: TF32 would cost ~1e-3 relative error), squared into a register
    sum, and written once at the end: LoRA layers have only a handful of tiles (O or I is the rank), so
    samples are split over programs and the splits meet in fisher through atomic_add.
    """
    pid_i = tl.program_id(0)
    pid_o = tl.program_id(1)
    pid_s = tl.program_id(2)
    splits = tl.num_programs(2)
    n_begin = pid_s * N // splits
    n_end = (pid_s + 1) * N // splits

    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_r = tl.arange(0, BLOCK_R)
    total = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    # 64-bit sample offsets (N * R * O may pass 2**31); a sample's own offsets stay 32-bit.
    g_base = grad_ptr + n_begin.to(tl.int64) * stride_gn
    x_base = input_ptr + n_begin.to(tl.int64) * stride_xn
    for _ in range(n_begin, n_end):
        tile = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            rows = r0 + offs_r
            g = tl.load(
                g_base + rows[:, None] * stride_gr + offs_o[None, :] * stride_go,
                mask=(rows[:, None] < R) & (offs_o[None, :] < O), other=0.0,
            )
            x = tl.load(
                x_base + rows[:, None] * stride_xr + offs_i[None, :] * stride_xi,
                mask=(rows[:, None] < R) & (offs_i[None, :] < I), other=0.0,
            )
            tile = tl.dot(tl.trans(g), x, tile, input_precision="ieee")
        total += tile * tile
        g_base += stride_gn
        x_base += stride_xn

    ptrs = fisher_ptr + offs_o[:, None] * I + offs_i[None, :]
    mask = (offs_o[:, None] < O) & (offs_i[None, :] < I)
    if ATOMIC:
        tl.atomic_add(ptrs, total, mask=mask)
    else:
        tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + total, mask=mask)


def _block(size: int) -> int:
    # tl.dot needs every side >= 16; 64 keeps a tile's registers modest.
    return min(64, max(16, triton.next_power_of_2(size)))


def fisher_accumulate_(fisher: torch.Tensor, grad_output: torch.Tensor, input: torch.Tensor,
                       splits: Optional[int] = None) -> None:
    """fisher (O, I) float32 += sum_n (grad_output[n]^T input[n])^2; grad_output (N, R, O), input (N, R, I).

    `splits` (how many programs share one tile's samples) defaults to about two programs per SM.
    """
    n, r, o = grad_output.shape
    i = input.shape[2]
    if n == 0 or r == 0 or o == 0 or i == 0:
        return
    block_o, block_i = _block(o), _block(i)
    tiles = triton.cdiv(o, block_o) * triton.cdiv(i, block_i)
    if splits is None:
        sms = torch.cuda.get_device_properties(fisher.device).multi_processor_count if fisher.is_cuda else 4
        splits = triton.cdiv(2 * sms, tiles)
    splits = max(1, min(int(splits), n, 65535))
    grid = (triton.cdiv(i, block_i), triton.cdiv(o, block_o), splits)
    _fisher_fwd[grid](
        fisher, grad_output, input,
        n, r, o, i,
        *grad_output.stride(), *input.stride(),
        BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_R=32, ATOMIC=splits > 1,
    )
