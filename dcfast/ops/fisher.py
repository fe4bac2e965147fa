"""In-place per-sample Fisher (docs/design.md: the per-sample Fisher kernel): the Python face of `dcfast::fisher_accumulate_`.

    fisher[o, i] += sum_n ( sum_r grad_output[n, r, o] * input[n, r, i] )^2

For an nn.Linear whose rows of sample n are X_n = input[n] (R, I) with output gradients
G_n = grad_output[n] (R, O), G_n^T X_n is sample n's weight gradient: the op adds the squares of the
per-sample gradients into a persistent float32 buffer without ever writing them to memory. R counts
every row of a sample (tokens, and several model evaluations: K*T rows per image for the DC loss).
Mutates `fisher` only; no autograd (the Fisher is a statistic, not part of a loss graph).

On CUDA, LoRA-shaped layers take `fisher_accumulate_bmm_` instead of the fused kernel: their per-sample
gradients (N x O x I floats, a few MB) are smaller than the rows that produce them, so writing them
once costs little, and cuBLAS's batched GEMM runs on tensor cores (16-bit inputs into float32
outputs), where the fused kernel uses float32 FMAs. Estimate in benchmarks/RESULTS.md ("Fisher
roofline"); the GPU measurement that confirms or moves the boundary is pending.
"""
from __future__ import annotations

import torch

from dcfast import _backend

OP = "fisher_accumulate_"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the kernels'; float64 runs the reference


def _square_sum(grad_output: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    compute = torch.float64 if input.dtype == torch.float64 else torch.float32
    per_sample = torch.einsum("nro,nri->noi", grad_output.to(compute), input.to(compute))
    return per_sample.square().sum(0)


# Per-sample gradients up to 16M floats (64 MiB) may be written by the bmm path (SD 1.5's largest LoRA
# layer, d=1280 r=64 at N=16, needs 1.3M).
BMM_MAX_FLOATS = 1 << 24


def uses_bmm(device: torch.device, N: int, R: int, O: int, I: int) -> bool:
    """Whether the public op sends this (N, R, O, I) problem to `fisher_accumulate_bmm_`: on CUDA, when the
    per-sample gradients (N*O*I floats) are no larger than the rows they come from (N*R*(O+I)) and
    under BMM_MAX_FLOATS. Elsewhere (large layers, few rows; CPU) the fused kernel never writes them."""
    return device.type == "cuda" and N * O * I <= min(BMM_MAX_FLOATS, N * R * (O + I))


def fisher_accumulate_bmm_(fisher: torch.Tensor, grad_output: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """fisher += sum_n (grad_output[n]^T input[n])^2 through one batched GEMM into float32 per-sample
    gradients (N, O, I), squared and summed over n in a fixed order (deterministic). 16-bit inputs on
    CUDA stay 16-bit for the GEMM (tensor cores, float32 accumulation and output); elsewhere they are
    widened first (CPU GEMMs on 16-bit types round their output to 16 bits)."""
    g = grad_output.transpose(1, 2)
    if fisher.is_cuda and input.dtype in (torch.float16, torch.bfloat16):
        per_sample = torch.bmm(g, input, out_dtype=torch.float32)
    else:
        compute = torch.float64 if input.dtype == torch.float64 else torch.float32
        per_sample = torch.bmm(g.to(compute), input.to(compute))
    return fisher.add_(per_sample.square_().sum(0))


def fisher_accumulate_reference(fisher: torch.Tensor, grad_output: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """Plain-torch reference: fisher + sum_n (grad_output[n]^T input[n])^2, summed in float32 (float64 for
    float64 inputs); fisher is not modified."""
    return fisher + _square_sum(grad_output, input)


def _check(fisher: torch.Tensor, grad_output: torch.Tensor, input: torch.Tensor,
           dtypes: tuple = DTYPES + (torch.float64,)) -> None:
    for name, tensor in (("fisher", fisher), ("grad_output", grad_output), ("input", input)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if grad_output.dim() != 3 or input.dim() != 3:
        raise ValueError(
            f"grad_output must be (N, R, O) and input (N, R, I); got grad_output {tuple(grad_output.shape)}, "
            f"input {tuple(input.shape)}"
        )
    if grad_output.shape[:2] != input.shape[:2]:
        raise ValueError(
            f"grad_output {tuple(grad_output.shape)} and input {tuple(input.shape)} must share (N, R)"
        )
    expected = (grad_output.shape[2], input.shape[2])
    if tuple(fisher.shape) != expected:
        raise ValueError(f"fisher must be (O, I) = {expected} for grad_output {tuple(grad_output.shape)} "
                         f"and input {tuple(input.shape)}, got {tuple(fisher.shape)}")
    if fisher.dtype != torch.float32:
        raise TypeError(f"fisher must be float32, got {fisher.dtype}")
    if not fisher.is_contiguous():
        raise ValueError(f"fisher must be contiguous, got strides {fisher.stride()} for shape {tuple(fisher.shape)}")
    if grad_output.dtype != input.dtype:
        raise TypeError(f"grad_output and input must share a dtype, got {grad_output.dtype} and {input.dtype}")
    if grad_output.dtype not in dtypes:
        raise TypeError(f"grad_output and input must be one of {[str(d)[6:] for d in dtypes]}, got {grad_output.dtype}")
    if not (fisher.device == grad_output.device == input.device):
        raise ValueError(f"fisher, grad_output and input must be on one device, got {fisher.device}, "
                         f"{grad_output.device} and {input.device}")


@torch.compiler.assume_constant_result  # a dispatcher query dynamo cannot trace; fixed once dcfast is imported
def _uses_op(device: torch.device) -> bool:
    return _backend.has_kernel(OP, "CPU" if device.type == "cpu" else "CUDA")


def fisher_accumulate_(fisher: torch.Tensor, grad_output: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """fisher (O, I) float32 += sum_n (grad_output[n]^T input[n])^2, in place; returns fisher.

    grad_output (N, R, O) and input (N, R, I) share a dtype (float32, float16 or bfloat16; float64 is
    summed in float64 by the reference, then stored); sums are float32. On CUDA, LoRA shapes run
    `fisher_accumulate_bmm_` (see `uses_bmm`); otherwise the compiled kernel of the device when there
    is one (C++ on CPU; CUDA C++ or Triton on CUDA), else the torch reference. Every path gives the
    same bits on every run (no atomics), so torch.use_deterministic_algorithms(True) holds.
    """
    _check(fisher, grad_output, input)
    if input.dtype == torch.float64:
        fisher.add_(_square_sum(grad_output, input))
    elif uses_bmm(fisher.device, *grad_output.shape, input.shape[2]):
        fisher_accumulate_bmm_(fisher, grad_output, input)
    elif _uses_op(fisher.device):
        torch.ops.dcfast.fisher_accumulate_(fisher, grad_output, input)
    else:
        _backend.warn_if_reference_only()
        fisher.add_(_square_sum(grad_output, input))
    return fisher


def _register() -> None:
    """Fake impl, and the Triton kernel for CUDA when no CUDA C++ kernel was built."""
    if not _backend.extension_loaded():
        return

    @torch.library.register_fake(f"dcfast::{OP}")
    def _(fisher, grad_output, input):
        return None

    if torch.cuda.is_available() and not _backend.has_kernel(OP, "CUDA") and _backend.triton_available():
        from dcfast.kernels import fisher as triton_fisher

        @torch.library.impl(f"dcfast::{OP}", "CUDA")
        def _(fisher, grad_output, input):
            _check(fisher, grad_output, input, DTYPES)  # what the C++ backends check before launching
            triton_fisher.fisher_accumulate_(fisher, grad_output, input)


_register()
