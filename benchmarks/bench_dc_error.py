"""dcfast.ops.dc_error (fused) vs the torch eager chain (`dc_error_reference`), forward and
forward+backward, at the DC-score shape B=4 images x K=8 concepts x T=8 timesteps, latents 4x16x16
and 4x64x64. Run: python -m pytest benchmarks/bench_dc_error.py --benchmark-enable

Each case records provider, mode, median time, its ratio to the torch provider (>1: faster than
torch), peak extra memory and its ratio, device and versions in benchmark.extra_info; a summary
table is printed at the end. Peak memory: the CUDA allocator's high-water mark on CUDA; on CPU, a
running sum of the profiler's per-op allocations (CPU has no allocator statistics).
"""
import platform

import pytest
import torch

from dcfast import _backend
from dcfast.ops import dc_error, dc_error_reference

B, K, T = 4, 8, 8
LATENTS = {"4x16x16": 4 * 16 * 16, "4x64x64": 4 * 64 * 64}
MODES = ("forward", "full")
ROUNDS = 5  # a few seconds in all on two CPU cores

_RESULTS = {}  # (device, latent, mode) -> {provider: (median_s, peak_bytes)}


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _providers(device):
    # torch first: the other providers' ratios are taken against it
    extra = ["triton"] if device == "cuda" and _backend.triton_available() else []
    return ["torch", "dcfast"] + extra


CASES = [
    pytest.param(device, latent, mode, provider, id=f"{device}-{latent}-{mode}-{provider}")
    for device in _devices()
    for latent in LATENTS
    for mode in MODES
    for provider in _providers(device)
]


def _forward(provider):
    if provider == "torch":
        return dc_error_reference
    if provider == "dcfast":
        return dc_error
    from dcfast.kernels import dc_error as triton_kernels

    return triton_kernels.dc_error_forward


def _step(provider, mode, pred, noise, grad_err):
    """One timed call: the errors, and in 'full' mode the gradient of pred as well."""
    forward = _forward(provider)
    sync = torch.cuda.synchronize if pred.is_cuda else (lambda: None)

    def run():
        err = forward(pred, noise, "l2", 1.0)
        if mode == "full":
            if provider == "triton":  # the bare launchers: no autograd around them
                from dcfast.kernels import dc_error as triton_kernels

                triton_kernels.dc_error_backward(grad_err, pred, noise, "l2", 1.0)
            else:
                err.backward(grad_err)
                pred.grad = None
        sync()

    return run


def _peak_bytes(run, device):
    """Memory allocated above what was live before `run`, at its highest point."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        return torch.cuda.max_memory_allocated() - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("device, latent, mode, provider", CASES)
def test_dc_error(benchmark, device, latent, mode, provider):
    gen = torch.Generator().manual_seed(0)
    D = LATENTS[latent]
    pred = torch.randn(B, K, T, D, generator=gen).to(device).requires_grad_(mode == "full" and provider != "triton")
    noise = torch.randn(B, T, D, generator=gen).to(device)
    grad_err = torch.randn(B, K, T, generator=gen).to(device)
    run = _step(provider, mode, pred, noise, grad_err)
    run()  # warm-up (Triton compiles here)
    peak = _peak_bytes(run, device)

    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)

    median = benchmark.stats.stats.median if benchmark.stats else float("nan")
    base_median, base_peak = _RESULTS.setdefault((device, latent, mode), {}).get("torch", (median, peak))
    _RESULTS[(device, latent, mode)][provider] = (median, peak)
    benchmark.extra_info.update(
        provider=provider,
        mode=mode,
        shape=[B, K, T, D],
        dtype="float32",
        median_s=median,
        speedup_vs_torch=base_median / median,
        peak_bytes=peak,
        peak_ratio_vs_torch=peak / base_peak if base_peak else float("nan"),
        device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        backends=_backend.backend_info(),
    )


@pytest.fixture(scope="module", autouse=True)
def _summary_table(request):
    """Prints provider, median, speedup, peak memory and its ratio per case, past pytest's capture."""
    yield
    terminal = request.config.pluginmanager.get_plugin("terminalreporter")
    if terminal is None or not _RESULTS:
        return
    lines = [f"dc_error, B={B} K={K} T={T}, float32, l2 (speedup and memory ratio vs torch)",
             f"{'device':6} {'latent':8} {'mode':7} {'provider':8} {'median ms':>10} {'speedup':>8} "
             f"{'peak MiB':>9} {'mem ratio':>9}"]
    for (device, latent, mode), by_provider in _RESULTS.items():
        base_median, base_peak = by_provider.get("torch", (float("nan"), 0))
        for provider, (median, peak) in by_provider.items():
            ratio = peak / base_peak if base_peak else float("nan")
            lines.append(f"{device:6} {latent:8} {mode:7} {provider:8} {median * 1e3:10.3f} "
                         f"{base_median / median:8.2f} {peak / 2**20:9.3f} {ratio:9.3f}")
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        terminal.write_line("")
        for line in lines:
            terminal.write_line(line)
