"""Triton kernel of `dcfast::fisher_accumulate_` (docs/design.md: the per-sample Fisher kernel), registered for CUDA by dcfast.ops.fisher.

    fisher[o, i] += sum_n ( sum_r grad_output[n, r, o] * input[n, r, i] )^2

Runs on CUDA devices, and on CPU tensors under TRITON_INTERPRET=1 (float32/float16 only there: the
interpreter computes bfloat16 wrongly and silently).

The same plans as the CUDA C++ kernel (csrc/cuda/fisher_kernel.cu): a program owns a tile of the
output, a group of samples and a range of rows, and stores into a float32 workspace that torch then
sums in a fixed order, so results repeat bit for bit (no atomics):
  sample groups  (G, O, I): program g stores sum over its samples of the squared per-sample tile;
  row splits     (N, S, O, I): program (n, s) stores its raw partial of G_n^T X_n over R/S rows,
                 for LoRA layers (a handful of tiles) with few samples; squared after summing over s.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from dcfast.kernels._launch import device_guard

MAX_WORKSPACE = 1 << 24  # floats (64 MiB): the same cap as the CUDA C++ kernel
PROGRAMS_PER_SM = 4  # LoRA layers are memory-bound (~r flops per byte): keep every SM's loads in flight
INTERPRET_BLOCK_R = 32  # rows per slab without autotuning (CPU tensors under the interpreter)


@triton.jit
def _fisher_partial(
    ws_ptr, grad_ptr, input_ptr,
    N, R, O, I, splits,
    stride_gn, stride_gr, stride_go,
    stride_xn, stride_xr, stride_xi,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr,
    SQUARE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (pid_i, pid_o, z): a BLOCK_O x BLOCK_I tile of workspace[z], z = g * splits + s.

    Samples [g*N/G, (g+1)*N/G) with G = num_programs(2) / splits, rows [s*R/splits, (s+1)*R/splits).
    Per sample the tile of G_n^T X_n is built from BLOCK_R-row slabs with tl.dot (fp32 accumulation;
    PRECISION "ieee" or "tf32" for float32 inputs, tensor cores for 16-bit ones); with SQUARE
    (splits == 1) the squared tiles are summed, else (one sample per program) the raw tile is stored.
    """
    pid_i = tl.program_id(0)
    pid_o = tl.program_id(1)
    z = tl.program_id(2)
    groups = tl.num_programs(2) // splits
    g = z // splits
    s = z % splits
    n_begin = g * N // groups
    n_end = (g + 1) * N // groups
    r_begin = s * R // splits
    r_end = (s + 1) * R // splits

    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_r = tl.arange(0, BLOCK_R)
    total = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    # 64-bit sample offsets (N * R * O may pass 2**31); a sample's own offsets stay 32-bit.
    g_base = grad_ptr + n_begin.to(tl.int64) * stride_gn
    x_base = input_ptr + n_begin.to(tl.int64) * stride_xn
    for _ in range(n_begin, n_end):
        tile = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
        for r0 in range(r_begin, r_end, BLOCK_R):
            rows = r0 + offs_r
            g_tile = tl.load(
                g_base + rows[:, None] * stride_gr + offs_o[None, :] * stride_go,
                mask=(rows[:, None] < r_end) & (offs_o[None, :] < O), other=0.0,
            )
            x_tile = tl.load(
                x_base + rows[:, None] * stride_xr + offs_i[None, :] * stride_xi,
                mask=(rows[:, None] < r_end) & (offs_i[None, :] < I), other=0.0,
            )
            tile = tl.dot(tl.trans(g_tile), x_tile, tile, input_precision=PRECISION)
        if SQUARE:
            total += tile * tile
        else:
            total += tile
        g_base += stride_gn
        x_base += stride_xn

    ptrs = ws_ptr + z.to(tl.int64) * O * I + offs_o[:, None] * I + offs_i[None, :]
    tl.store(ptrs, total, mask=(offs_o[:, None] < O) & (offs_i[None, :] < I))


# A few configs (first calls tune in well under a second per shape): slab rows, warps, pipeline stages.
# The kernel only stores into the workspace, so re-running it while tuning is harmless.
_fisher_partial_tuned = triton.autotune(
    configs=[
        triton.Config({"BLOCK_R": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_R": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_R": 64}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_R": 128}, num_warps=8, num_stages=3),
    ],
    key=["R", "O", "I", "SQUARE", "PRECISION"],
)(_fisher_partial)


def _block(size: int) -> int:
    # tl.dot needs every side >= 16; 64 keeps a tile's registers modest.
    return min(64, max(16, triton.next_power_of_2(size)))


def plan(N: int, R: int, O: int, I: int, programs: int) -> Tuple[int, int]:
    """(sample groups, row splits) for an (N, R, O, I) problem and a target number of programs.

    Tiles alone fill the target: (1, 1). Else samples are grouped until they do, and when even one
    program per sample and tile falls short (LoRA layers, few samples) every sample's rows are split
    too. The workspace (groups * splits * O * I floats) stays under MAX_WORKSPACE.
    """
    tiles = triton.cdiv(O, _block(O)) * triton.cdiv(I, _block(I))
    if tiles >= programs or N <= 0:
        return 1, 1
    if N * tiles >= programs:
        groups, splits = triton.cdiv(programs, tiles), 1
    else:
        groups, splits = N, min(triton.cdiv(programs, N * tiles), max(1, triton.cdiv(R, 16)))
    if groups * splits * O * I > MAX_WORKSPACE and splits > 1:
        splits = max(1, MAX_WORKSPACE // (N * O * I))
    if groups * splits * O * I > MAX_WORKSPACE:
        groups = max(1, MAX_WORKSPACE // (O * I))
    return groups, splits


def fisher_accumulate_(fisher: torch.Tensor, grad_output: torch.Tensor, input: torch.Tensor,
                       groups: Optional[int] = None, splits: Optional[int] = None,
                       block_r: Optional[int] = None) -> None:
    """fisher (O, I) float32 += sum_n (grad_output[n]^T input[n])^2; grad_output (N, R, O), input (N, R, I).

    `groups` and `splits` (sample groups and row splits per tile) default to `plan` for about
    PROGRAMS_PER_SM programs per SM; `block_r` fixes the slab rows (default: autotuned on CUDA,
    INTERPRET_BLOCK_R on CPU). float32 inputs use TF32 tensor cores exactly when torch's own CUDA
    matmuls do (`torch.backends.cuda.matmul.allow_tf32`), else IEEE float32 products.
    """
    n, r, o = grad_output.shape
    i = input.shape[2]
    if n == 0 or r == 0 or o == 0 or i == 0:
        return
    if groups is None or splits is None:
        sms = torch.cuda.get_device_properties(fisher.device).multi_processor_count if fisher.is_cuda else 1
        groups, splits = plan(n, r, o, i, PROGRAMS_PER_SM * sms)
    groups, splits = max(1, min(int(groups), n)), max(1, min(int(splits), r))
    if splits > 1:
        groups = n  # a row split holds one sample's raw partial: squares are taken after summing over splits
    if groups * splits > 65535:
        raise ValueError(f"dcfast.fisher_accumulate_ (Triton): {groups} sample groups x {splits} row splits "
                         "exceed the grid's 65535 programs")
    block_o, block_i = _block(o), _block(i)
    tf32 = fisher.is_cuda and input.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    workspace = torch.empty((groups * splits, o, i), device=fisher.device, dtype=torch.float32)
    grid = (triton.cdiv(i, block_i), triton.cdiv(o, block_o), groups * splits)
    args = (workspace, grad_output, input, n, r, o, i, splits, *grad_output.stride(), *input.stride())
    meta = dict(BLOCK_O=block_o, BLOCK_I=block_i, SQUARE=splits == 1, PRECISION="tf32" if tf32 else "ieee")
    with device_guard(fisher):
        if block_r is None and fisher.is_cuda:
            _fisher_partial_tuned[grid](*args, **meta)
        else:
            _fisher_partial[grid](*args, BLOCK_R=block_r or INTERPRET_BLOCK_R, **meta)
    # Fixed-order sums: the same bits on every run.
    if splits > 1:
        fisher.add_(workspace.view(n, splits, o, i).sum(1).square_().sum(0))
    else:
        fisher.add_(workspace.sum(0))
