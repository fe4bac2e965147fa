"""Per-sample Fisher of a LoRA tiny U-Net, N=16, 16x16 and 32x32 latents: FisherAccumulator (one
batched pass, fused square-accumulate) vs the naive loop (one backward per sample) vs torch.func vmap(grad).
Run: python -m pytest benchmarks/bench_fisher.py --benchmark-enable

extra_info carries provider, size, ratio of the naive median to this one (>1: faster), peak memory and
its ratio to vmap, the max relative error against the naive loop, device and versions. Within a size
naive and vmap run before dcfast, so its ratios can be formed.
"""
import pytest
import torch

from dcfast.bench.common import environment, median_time, peak_memory
from dcfast.bench.fisher import denoise_losses, lora_unet, providers, rel_err
from dcfast.models.tiny import tiny_scheduler

N = 16
CASES = [(size, provider) for size in (16, 32) for provider in ("naive", "vmap", "dcfast")]
_DONE = {}  # (size, provider) -> (median seconds, peak bytes, Fisher)

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # vmap over CPU SDPA


@pytest.mark.parametrize("size, provider", CASES, ids=[f"{s}x{s}-{p}" for s, p in CASES])
def test_fisher(benchmark, size, provider):
    unet, size, dim, tokens = lora_unet("cpu", size)
    gen = torch.Generator().manual_seed(0)
    samples = (torch.randn(N, 4, size, size, generator=gen), torch.randn(N, 4, size, size, generator=gen),
               torch.randint(0, 1000, (N,), generator=gen), torch.randn(N, tokens, dim, generator=gen))
    call = providers(unet, denoise_losses(tiny_scheduler().alphas_cumprod), samples)[provider]

    fisher = benchmark.pedantic(call, rounds=3, warmup_rounds=1)
    median = benchmark.stats.stats.median if benchmark.stats else median_time(call, 1, "cpu", warmup=0)
    _, peak = peak_memory(call, "cpu")
    _DONE[(size, provider)] = (median, peak, fisher)
    info = {"provider": provider, "size": size, "N": N, "median_s": median, "peak_mem_mb": peak / 2**20}
    if (size, "naive") in _DONE and (size, "vmap") in _DONE:
        naive_median, _, naive_fisher = _DONE[(size, "naive")]
        info.update(ratio_vs_naive=naive_median / median, mem_ratio_vs_vmap=peak / max(_DONE[(size, "vmap")][1], 1),
                    max_rel_err=rel_err(fisher, naive_fisher))
        assert info["max_rel_err"] <= 1e-5
    benchmark.extra_info.update(**info, **environment("cpu"))
