"""dcfast.dc_scores (one chunked batched U-Net pass, exact work shared across concepts) vs dc_scores_naive
(one U-Net call per concept and timestep) and vs the peer (Diffusion Classifier's batching, 32 rows per call,
dcfast.bench.peer), no-grad and with grad, tiny U-Net at 16x16 and 32x32 latents, B=4, K=8, T=8; and the
memory-bounded gradient vs the unchunked backward at K*T=64.
Run: python -m pytest benchmarks/bench_dc_scores.py --benchmark-enable

extra_info carries provider, mode, the ratios of the naive and peer medians to this one (>1: faster), peak
memory and its ratio to naive, device and versions. Naive and peer run first in each case so dcfast can report
the ratios. Cases run one after another (pytest-benchmark's rounds), not interleaved: on a shared machine
prefer `dcfast bench dc-scores`, whose ratios come from interleaved rounds.
"""
import pytest
import torch
import torch.nn.functional as F

from dcfast.bench.common import environment, peak_memory
from dcfast.bench.dc_scores import gradient_memory_case, make_problem
from dcfast.bench.peer import dc_scores_peer
from dcfast.models.tiny import tiny_scheduler, tiny_unet
from dcfast.engine.reference import dc_scores_naive
from dcfast.engine.scores import dc_logits, dc_scores

B, K, T = 4, 8, 8
ENGINES = {"naive": dc_scores_naive, "peer": dc_scores_peer, "dcfast": dc_scores}
_BASE = {}  # (provider, size, mode) -> (median seconds, peak bytes) of naive and peer


@pytest.fixture(scope="module")
def scheduler():
    return tiny_scheduler()


@pytest.mark.parametrize("provider", list(ENGINES))
@pytest.mark.parametrize("mode", ["no-grad", "grad"])
@pytest.mark.parametrize("size", [16, 32])
def test_dc_scores(benchmark, scheduler, size, mode, provider):
    if provider == "peer" and mode == "grad":
        pytest.skip("the peer scores under inference mode only")
    unet = tiny_unet(seed=0, sample_size=size)
    x0, cond, noise, timesteps = make_problem(B, K, T, size, 4, 32, 8, torch.float32, "cpu")
    engine = ENGINES[provider]
    labels = torch.zeros(B, dtype=torch.long)

    def run():
        if mode == "no-grad":
            with torch.no_grad():
                return engine(unet, scheduler, x0, cond, timesteps=timesteps, noise=noise)
        F.cross_entropy(dc_logits(engine(unet, scheduler, x0, cond, timesteps=timesteps, noise=noise)), labels).backward()
        unet.zero_grad(set_to_none=True)

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)  # the warm-up call also tunes dcfast's chunk size
    _, peak = peak_memory(run, "cpu")
    median = benchmark.stats.stats.median
    if provider in ("naive", "peer"):
        _BASE[(provider, size, mode)] = (median, peak)
    naive_median, naive_peak = _BASE[("naive", size, mode)]
    ratios = dict(ratio_vs_naive=naive_median / median)
    if ("peer", size, mode) in _BASE:
        ratios["ratio_vs_peer"] = _BASE[("peer", size, mode)][0] / median
    benchmark.extra_info.update(provider=provider, mode=mode, size=size, **ratios, peak_mem_mb=peak / 2**20,
                                mem_ratio_vs_naive=peak / max(naive_peak, 1), **environment("cpu"))


def test_memory_bounded_gradient(benchmark):
    rows = benchmark.pedantic(lambda: gradient_memory_case("cpu", 16), rounds=1)
    unchunked, bounded = rows
    benchmark.extra_info.update(unchunked_peak_mb=unchunked["peak_mem_mb"], bounded_peak_mb=bounded["peak_mem_mb"],
                                mem_ratio=bounded["mem_ratio"], grad_rel_err=bounded["grad_rel_err"],
                                **environment("cpu"))
    assert bounded["grad_rel_err"] <= 1e-5
