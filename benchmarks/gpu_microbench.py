"""CUDA-event microbenchmarks of the two ops at Stable Diffusion 1.5 shapes, one JSON file out.

    python3 benchmarks/gpu_microbench.py --json "$OUT/microbench.json"

fisher_accumulate_ on the SD 1.5 LoRA factors (N=16 images, R=4096 tokens of the 64x64 level,
d in {320, 640, 1280}, r in {4, 16, 64}; A: O=r, I=d, B: O=d, I=r) per provider: the CUDA C++ op
(when built), the Triton launcher (autotuned; tuning runs before timing), the bmm path the public op
takes for LoRA shapes, and the einsum reference. dc_error forward and backward at SD 1.5 latents
(D = 4*64*64) and at the tiny model's (D = 4*16*16) per provider: CUDA C++ op, Triton, reference.
Each row: median ms over timed repeats (CUDA events around each call, after warm-up), GB/s of the
bytes the op must move at least, TFLOP/s (Fisher), and the fraction of the device's HBM bandwidth.

`--device cpu` (with TRITON_INTERPRET=1; tiny shapes, wall-clock timing) is a dry run of this script's
own logic for machines without a GPU: python_tests/ops/test_gpu_scripts.py runs it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable, Dict, List

import torch

import dcfast
from dcfast import _backend
from dcfast.ops.dc_error import dc_error_reference
from dcfast.ops.fisher import fisher_accumulate_bmm_, fisher_accumulate_reference

HBM_GBPS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}  # vendor peak, for the roofline fraction


def median_ms(fn: Callable[[], object], device: str, warmup: int = 3, repeats: int = 20) -> float:
    """Median milliseconds of fn() after warm-up calls: CUDA events around each call on CUDA (one pair per
    call, synchronised), wall clock elsewhere."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def peak_gbps(device: str) -> float:
    name = torch.cuda.get_device_name() if device == "cuda" else ""
    return next((v for k, v in HBM_GBPS.items() if k in name), float("nan"))


# SD 1.5's LoRA factors at the 64x64 level; dc_error at SD 1.5 latents and at the tiny model's.
FISHER_SHAPES = [(16, 4096, d, r) for d in (320, 640, 1280) for r in (4, 16, 64)]  # (N, R, d, r)
DC_ERROR_SHAPES = [(4, 8, 8, 4 * 64 * 64), (8, 16, 8, 4 * 64 * 64), (16, 16, 8, 4 * 16 * 16)]
DRY_RUN_FISHER_SHAPES, DRY_RUN_DC_ERROR_SHAPES = [(2, 40, 33, 4)], [(2, 3, 2, 64)]


def fisher_rows(device: str, dtypes, shapes) -> List[Dict]:
    from dcfast.kernels import fisher as triton_fisher

    providers = {"einsum-reference": lambda f, g, x: f.copy_(fisher_accumulate_reference(f, g, x)),
                 "bmm": fisher_accumulate_bmm_, "triton": triton_fisher.fisher_accumulate_}
    if device == "cuda" and _backend.cuda_cpp_ops()["fisher_accumulate_"]:
        providers["cuda-c++"] = torch.ops.dcfast.fisher_accumulate_
    rows = []
    for dtype in dtypes:
        for N, R, d, r in shapes:
            for factor, (O, I) in (("A", (r, d)), ("B", (d, r))):
                g = torch.randn(N, R, O, device=device, dtype=dtype)
                x = torch.randn(N, R, I, device=device, dtype=dtype)
                want = fisher_accumulate_reference(torch.zeros(O, I, device=device), g, x)
                moved = N * R * (O + I) * g.element_size() + 2 * O * I * 4
                for name, op in providers.items():
                    fisher = torch.zeros(O, I, device=device)
                    op(fisher, g, x)  # also Triton's autotuning, before timing
                    err = ((fisher - want).abs().max() / want.abs().max()).item()
                    ms = median_ms(lambda: op(fisher, g, x), device)
                    rows.append({"op": "fisher_accumulate_", "provider": name, "dtype": str(dtype)[6:],
                                 "N": N, "R": R, "O": O, "I": I, "factor": f"lora_{factor} d={d} r={r}",
                                 "median_ms": ms, "gb_per_s": moved / ms / 1e6,
                                 "tflop_per_s": 2 * N * R * O * I / ms / 1e9, "max_rel_err": err})
    return rows


def dc_error_rows(device: str, dtypes, shapes) -> List[Dict]:
    from dcfast.kernels import dc_error as triton_dc_error

    rows = []
    for dtype in dtypes:
        for (B, K, T, D) in shapes:
            pred = torch.randn(B, K, T, D, device=device, dtype=dtype)
            noise = torch.randn(B, T, D, device=device, dtype=dtype)
            grad_err = torch.randn(B, K, T, device=device)
            want = dc_error_reference(pred, noise)
            p_req = pred.clone().requires_grad_()
            providers = {
                "reference": (lambda: dc_error_reference(pred, noise),
                              lambda: torch.autograd.grad(dc_error_reference(p_req, noise), p_req, grad_err)),
                "triton": (lambda: triton_dc_error.dc_error_forward(pred, noise, "l2", 1.0),
                           lambda: triton_dc_error.dc_error_backward(grad_err, pred, noise, "l2", 1.0)),
            }
            if device == "cuda" and _backend.cuda_cpp_ops()["dc_error"]:
                providers["cuda-c++"] = (lambda: torch.ops.dcfast.dc_error(pred, noise, "l2", 1.0),
                                         lambda: torch.ops.dcfast.dc_error_backward(grad_err, pred, noise, "l2", 1.0))
            elt = pred.element_size()
            moved = {"forward": (B * K * T * D + B * T * D) * elt + B * K * T * 4,
                     "backward": (2 * B * K * T * D + B * T * D) * elt + B * K * T * 4}
            for name, (fwd, bwd) in providers.items():
                err = ((fwd() - want).abs().max() / want.abs().max()).item()
                for direction, fn in (("forward", fwd), ("backward", bwd)):
                    ms = median_ms(fn, device)
                    rows.append({"op": "dc_error", "provider": name, "direction": direction, "dtype": str(dtype)[6:],
                                 "B": B, "K": K, "T": T, "D": D, "median_ms": ms, "gb_per_s": moved[direction] / ms / 1e6,
                                 "max_rel_err": err})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--quick", action="store_true", help="float16 only")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: a dry run on tiny shapes under TRITON_INTERPRET=1 (default: cuda)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_microbench.py needs a CUDA device (or --device cpu for a dry run)")
    dtypes = (torch.float16,) if args.quick else (torch.float16, torch.float32)
    dry = args.device == "cpu"
    rows = (fisher_rows(args.device, dtypes, DRY_RUN_FISHER_SHAPES if dry else FISHER_SHAPES)
            + dc_error_rows(args.device, dtypes, DRY_RUN_DC_ERROR_SHAPES if dry else DC_ERROR_SHAPES))
    peak = peak_gbps(args.device)
    for row in rows:
        row["hbm_fraction"] = row["gb_per_s"] / peak
    result = {"device": torch.cuda.get_device_name() if not dry else "cpu (dry run)", "hbm_peak_gb_per_s": peak,
              "backends": dcfast.backend_info(), "torch": torch.__version__, "cuda": torch.version.cuda, "rows": rows}
    with open(args.json, "w") as handle:
        json.dump(result, handle, indent=1)
    for row in rows:
        case = row.get("factor") or f"B{row['B']} K{row['K']} T{row['T']} D{row['D']} {row['direction']}"
        print(f"{row['op']:<19} {row['provider']:<17} {row['dtype']:<8} {case:<32} {row['median_ms']:8.3f} ms "
              f"{row['gb_per_s']:8.1f} GB/s ({row['hbm_fraction']:.0%} HBM) rel err {row['max_rel_err']:.1e}")


if __name__ == "__main__":
    main()
