"""Both ops on odd shapes, every kernel layout and plan, for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 benchmarks/gpu_sanitize.py

Small problems (the sanitizer slows kernels ~100x): dc_error forward and backward with a warp per
row and a block per row, with and without 128-bit loads, and on unaligned views; fisher_accumulate_
with the direct, sample-group and row-split plans of the CUDA C++ kernel and the Triton launcher
(explicit plans and slab size, so no autotuning runs under the sanitizer). Every result is also
checked against the torch reference, so a silent out-of-bounds read shows as a wrong value too.

`--device cpu` (with TRITON_INTERPRET=1; float32/16, small shapes) is a dry run of this script's own
logic for machines without a GPU: python_tests/ops/test_gpu_scripts.py runs it.
"""
from __future__ import annotations

import argparse

import torch

from dcfast import _backend
from dcfast.kernels import dc_error as triton_dc_error
from dcfast.kernels import fisher as triton_fisher
from dcfast.ops.dc_error import dc_error_reference
from dcfast.ops.fisher import fisher_accumulate_reference


def unaligned(t: torch.Tensor) -> torch.Tensor:
    """The same values, one element into a fresh storage: no 16-byte alignment."""
    return torch.cat([t.new_zeros(1), t.flatten()])[1:].view(t.shape)


def close(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float) -> None:
    scale = want.abs().max().item() or 1.0
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}")


def check_dc_error(device: str, dtypes, cuda_cpp: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    for shape in ((3, 2, 1, 33), (2, 3, 2, 64), (1, 2, 1, 4099), (1, 1, 2, 4104)):
        B, K, T, D = shape
        for dtype in dtypes:
            pred = torch.randn(shape, generator=gen).to(device, dtype)
            noise = torch.randn(B, T, D, generator=gen).to(device, dtype)
            grad_err = torch.randn(B, K, T, generator=gen).to(device)
            for layout in ("aligned", "unaligned"):
                p, n = (pred, noise) if layout == "aligned" else (unaligned(pred), unaligned(noise))
                ref_p = p.detach().float().clone().requires_grad_()
                want = dc_error_reference(ref_p, n.float(), "huber", 0.5)
                want.backward(grad_err)
                rtol = 1e-5 if dtype == torch.float32 else 2e-2
                runs = {"triton": (triton_dc_error.dc_error_forward, triton_dc_error.dc_error_backward)}
                if cuda_cpp:
                    runs["cuda-c++"] = (torch.ops.dcfast.dc_error, torch.ops.dcfast.dc_error_backward)
                for name, (fwd, bwd) in runs.items():
                    what = f"dc_error {name} {shape} {dtype} {layout}"
                    close(fwd(p, n, "huber", 0.5), want.detach(), what, 1e-5)
                    close(bwd(grad_err, p, n, "huber", 0.5), ref_p.grad, what + " backward", rtol)


# CUDA C++ plans on a 132-SM device: direct, sample groups, row splits (LoRA A and B, odd sizes).
FISHER_SHAPES = ((1, 3, 1536, 1536), (8, 5, 640, 640), (3, 37, 5, 33), (5, 50, 70, 3))
DRY_RUN_FISHER_SHAPES = ((2, 3, 130, 70), (3, 37, 5, 33), (5, 50, 70, 3))


def check_fisher(device: str, dtypes, shapes, cuda_cpp: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    for shape in shapes:
        N, R, O, I = shape
        for dtype in dtypes:
            g = torch.randn(N, R, O, generator=gen).to(device, dtype)
            x = torch.randn(N, R, I, generator=gen).to(device, dtype)
            start = torch.rand(O, I, generator=gen).to(device)
            want = fisher_accumulate_reference(start, g, x)
            runs = {f"triton groups={groups} splits={splits}":
                    (lambda f, groups=groups, splits=splits: triton_fisher.fisher_accumulate_(
                        f, g, x, groups=groups, splits=splits, block_r=32))
                    for groups, splits in ((1, 1), (min(3, N), 1), (N, 3))}
            if cuda_cpp:
                runs["cuda-c++"] = lambda f: torch.ops.dcfast.fisher_accumulate_(f, g, x)
            for name, run in runs.items():
                got = start.clone()
                run(got)
                close(got, want, f"fisher {name} {shape} {dtype}", 1e-4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: a dry run under TRITON_INTERPRET=1 (default: cuda)")
    device = parser.parse_args().device
    if device == "cuda":
        cuda_cpp = all(_backend.cuda_cpp_ops().values())
        dtypes, shapes = (torch.float32, torch.float16, torch.bfloat16), FISHER_SHAPES
    else:
        cuda_cpp, dtypes, shapes = False, (torch.float32, torch.float16), DRY_RUN_FISHER_SHAPES
    check_dc_error(device, dtypes, cuda_cpp)
    check_fisher(device, dtypes, shapes, cuda_cpp)
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"gpu_sanitize: all checks passed on {device} (CUDA C++ kernels: {cuda_cpp})")


if __name__ == "__main__":
    main()
