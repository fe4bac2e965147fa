"""`dcfast bench dc-scores`: the batched engine vs the naive loop (one U-Net call per concept and timestep)
and vs the peer (Diffusion Classifier's batching, `dcfast.bench.peer`), timed interleaved in one run.

The full run adds the bare U-Net on the same rows (the engine's overhead), the engine with each exact
share alone (`dcfast.engine.unet_pass`), sizes 8x8 to 64x64 and the FLOP shares (`dcfast.bench.flops`).

Also measures the memory-bounded gradient (`dc_loss_backward`) against the unchunked backward at
K*T = 64 rows per image. CPU uses the tiny U-Net; CUDA a randomly initialised U-Net with Stable
Diffusion 1.5's exact config at 64x64 latents in fp16 (the real cost, no download).
"""
from __future__ import annotations

import statistics
import time
from typing import Dict, List

import torch
import torch.nn.functional as F

from dcfast.bench.common import environment, format_table, interleaved_medians, peak_memory
from dcfast.bench.peer import dc_scores_peer
from dcfast.models.tiny import tiny_scheduler, tiny_unet
from dcfast.engine.reference import dc_scores_naive
from dcfast.engine.chunks import chunk_tuner, unet_fingerprint
from dcfast.engine.scores import DEFAULT_SHARES, dc_logits, dc_loss_backward, dc_scores
from dcfast.engine.unet_pass import usable_shares

COLUMNS = ["case", "provider", "median_s", "ratio_vs_naive", "ratio_vs_peer", "peak_mem_mb", "mem_ratio",
           "overhead_vs_bare"]
# The engine with one share set each (dcfast.engine.unet_pass): "dcfast" itself runs the default set.
SHARE_PROVIDERS = {"dcfast-plain": (), "dcfast-prefix": ("prefix",), "dcfast-kv": ("kv",), "dcfast-temb": ("temb",)}
SHAPE = (4, 8, 8)  # B images, K concepts, T timesteps: the reference problem
GRAD_SHAPE = (1, 8, 8)  # K*T = 64 U-Net rows per image for the memory-bounded gradient


def sd15_unet(dtype: torch.dtype, device: str):
    """A randomly initialised UNet2DConditionModel with SD 1.5's config (64x64 latents, 768-d text)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    return unet.to(device=device, dtype=dtype).eval()


def _model(device: str, size: int):
    if torch.device(device).type == "cuda":
        return sd15_unet(torch.float16, device), torch.float16, 64, 768, 77
    return tiny_unet(seed=0, sample_size=size), torch.float32, size, 32, 8


def make_problem(B: int, K: int, T: int, size: int, channels: int, dim: int, tokens: int, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    x0 = torch.randn(B, channels, size, size, generator=g).to(device, dtype)
    cond = torch.randn(K, tokens, dim, generator=g).to(device, dtype)
    noise = torch.randn(B, T, channels, size, size, generator=g).to(device, dtype)
    timesteps = torch.arange(T) * (1000 // T) + 1000 // T // 2
    return x0, cond, noise, timesteps


def _bare_unet(unet, scheduler, problem, budget: int):
    """The U-Net alone on the engine's B*K*T rows (b, k, j) in calls of `budget` rows, inputs made beforehand."""
    x0, cond, noise, timesteps = problem
    B, K, T = x0.shape[0], cond.shape[0], timesteps.shape[-1]
    abar = scheduler.alphas_cumprod.to(x0.device)[timesteps].to(x0.dtype).view(1, 1, T, 1, 1, 1)
    rows = (abar.sqrt() * x0[:, None, None] + (1 - abar).sqrt() * noise[:, None]).expand(B, K, T, *x0.shape[1:])
    rows = rows.reshape(B * K * T, *x0.shape[1:])
    steps = timesteps.view(1, 1, T).expand(B, K, T).reshape(-1)
    text = cond[None, :, None].expand(B, K, T, *cond.shape[1:]).reshape(B * K * T, *cond.shape[1:])

    def run():
        with torch.inference_mode():
            for start in range(0, rows.shape[0], budget):
                unet(rows[start:start + budget], steps[start:start + budget],
                     encoder_hidden_states=text[start:start + budget], return_dict=False)
    return run


def _tuning(unet, share, grad: bool = False):
    """(settled, row budget) of the chunk tuner for this U-Net and share set; (True, None) when nothing is
    tuned (one chunk holds the pass, or a fixed size applies)."""
    shares = tuple(sorted(usable_shares(unet, DEFAULT_SHARES if share is None else share)))
    fingerprint = unet_fingerprint(unet)
    for key, best in chunk_tuner.choices().items():
        if key[0] == fingerprint and key[6] == shares and key[10] == grad:
            return best is not None, best
    return True, None


def _scores_case(unet, scheduler, problem, label: str, device: str, rounds: int, grad: bool,
                 providers=("naive", "peer", "dcfast"), memory: bool = True) -> List[Dict]:
    """Time `providers` on one problem, interleaved over `rounds` rounds; errors and ratios against naive/peer."""
    x0, cond, noise, timesteps = problem
    labels = torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device)

    def call(engine, **kwargs):
        def run():
            if not grad:
                with torch.no_grad():
                    return engine(unet, scheduler, x0, cond, timesteps=timesteps, noise=noise, **kwargs)
            err = engine(unet, scheduler, x0, cond, timesteps=timesteps, noise=noise, **kwargs)
            F.cross_entropy(dc_logits(err.float()), labels).backward()
            unet.zero_grad(set_to_none=True)
            return err.detach()
        return run

    shares = {"dcfast": None, **SHARE_PROVIDERS}
    engines = {"naive": call(dc_scores_naive), "peer": call(dc_scores_peer)}
    engines.update({name: call(dc_scores, share=share) for name, share in shares.items()})
    cases = {name: engines[name] for name in providers if name != "bare"}
    results, first_call = {}, {}
    for name, fn in cases.items():  # warm-up: the engine's first call of a shape also tunes its chunk size
        start = time.perf_counter()
        results[name] = fn()
        first_call[name] = time.perf_counter() - start
    if "bare" in providers:  # the U-Net alone on the same rows, in the plain engine's chunks
        budget = _tuning(unet, ())[1] or x0.shape[0] * cond.shape[0] * timesteps.shape[-1]
        cases = {"bare": _bare_unet(unet, scheduler, problem, budget), **cases}
        cases["bare"]()
    times = interleaved_medians(cases, rounds, device)
    rows = []
    for name in providers:
        row = {"case": label, "provider": name, "median_s": statistics.median(times[name]),
               "rounds_s": [round(t, 4) for t in times[name]]}
        if name in results:
            row["max_abs_err"] = (results[name].float() - results["naive"].float()).abs().max().item()
            if memory and name in ("naive", "peer", "dcfast"):
                row["peak_mem_mb"] = peak_memory(cases[name], device)[1] / 2**20
        if name == "bare":
            row["chunk_rows"] = budget
        elif name in shares:
            row["chunk_rows"] = _tuning(unet, shares[name], grad)[1]
            row["first_call_s"] = first_call[name]  # includes the chunk tuning of this shape
        rows.append(row)
    by_name = {row["provider"]: row for row in rows}
    for row in rows:
        row["ratio_vs_naive"] = by_name["naive"]["median_s"] / row["median_s"]
        if "peer" in by_name:
            row["ratio_vs_peer"] = by_name["peer"]["median_s"] / row["median_s"]
        if memory and "peak_mem_mb" in row:
            row["mem_ratio"] = row["peak_mem_mb"] / max(by_name["naive"].get("peak_mem_mb", 0.0), 1e-9)
    if "bare" in by_name and "dcfast-plain" in by_name:
        by_name["dcfast-plain"]["overhead_vs_bare"] = by_name["dcfast-plain"]["median_s"] / by_name["bare"]["median_s"] - 1
        by_name["dcfast"]["vs_bare"] = by_name["bare"]["median_s"] / by_name["dcfast"]["median_s"]
    return rows


def gradient_memory_case(device: str, size: int, shape=None) -> List[Dict]:
    """Peak memory of the unchunked backward vs the memory-bounded one in chunks of K*T/8 rows.

    `shape` (B, K, T) defaults to GRAD_SHAPE, K*T = 64 U-Net rows per image.
    """
    unet, _, size, dim, tokens = _model(device, size)
    # float64 on CPU so the equality check sees the algorithm, not fp32 summation order; fp32 on CUDA.
    dtype = torch.float32 if torch.device(device).type == "cuda" else torch.float64
    unet.to(dtype)
    scheduler = tiny_scheduler()
    B, K, T = shape or GRAD_SHAPE
    max_batch = max(1, K * T // 8)
    x0, cond, noise, timesteps = make_problem(B, K, T, size, unet.config.in_channels, dim, tokens, dtype, device)
    labels = torch.zeros(B, dtype=torch.long, device=device)

    def loss_fn(err):
        return F.cross_entropy(dc_logits(err), labels)

    def unchunked():
        err = dc_scores(unet, scheduler, x0, cond, timesteps=timesteps, noise=noise, max_batch=B * K * T)
        loss_fn(err).backward()
        return [p.grad.clone() for p in unet.parameters() if p.grad is not None]

    def bounded():
        dc_loss_backward(unet, scheduler, x0, cond, loss_fn, timesteps=timesteps, noise=noise, max_batch=max_batch)
        return [p.grad.clone() for p in unet.parameters() if p.grad is not None]

    unet.zero_grad(set_to_none=True)
    reference, full_peak = peak_memory(unchunked, device)
    unet.zero_grad(set_to_none=True)
    got, bounded_peak = peak_memory(bounded, device)
    unet.zero_grad(set_to_none=True)
    flat_ref, flat_got = torch.cat([g.flatten() for g in reference]), torch.cat([g.flatten() for g in got])
    rel = ((flat_got - flat_ref).norm() / flat_ref.norm()).item()
    label = f"grad K*T={K * T} chunk={max_batch}"
    return [
        {"case": label, "provider": "unchunked", "peak_mem_mb": full_peak / 2**20, "mem_ratio": 1.0},
        {"case": label, "provider": "memory-bounded", "peak_mem_mb": bounded_peak / 2**20,
         "mem_ratio": bounded_peak / max(full_peak, 1), "grad_rel_err": rel},
    ]


def run(quick: bool = False, device: str = "cpu") -> Dict[str, object]:
    """Run the DC-score benchmark, print its table, and return rows plus the headline numbers.

    --quick: 16x16, B=4 K=8 T=8, naive / peer / dcfast, no grad, 3 interleaved rounds. Full: sizes 8, 16
    and 32 (B=4) and 64 (B=1: the naive loop takes minutes there) with the bare U-Net, the engine without
    shares and with each share alone; a grad case at 16x16; the memory-bounded gradient; FLOP shares.
    """
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    scheduler = tiny_scheduler()
    B, K, T = SHAPE
    cuda = torch.device(device).type == "cuda"
    sizes = [16] if quick else [8, 16, 32, 64]
    rounds = 3 if quick else 5
    rows: List[Dict] = []
    for size in sizes:
        unet, dtype, latent, dim, tokens = _model(device, size)
        images = 1 if size >= 64 and not cuda else B
        problem = make_problem(images, K, T, latent, unet.config.in_channels, dim, tokens, dtype, device)
        label = f"{latent}x{latent} B={images} K={K} T={T} no-grad"
        if quick or cuda:
            providers = ("naive", "peer", "dcfast")
        elif size >= 64:
            providers = ("naive", "peer", "bare", "dcfast-plain", "dcfast")
        else:
            providers = ("naive", "peer", "bare", *SHARE_PROVIDERS, "dcfast")
        rows += _scores_case(unet, scheduler, problem, label, device, 3 if size >= 64 else rounds, False,
                             providers, memory=size <= 32)
        if not quick and size == 16 and not cuda:
            rows += _scores_case(unet, scheduler, problem, label.replace("no-grad", "grad"), device, 3, True,
                                 ("naive", "dcfast"), memory=False)
        if cuda:
            break  # one SD 1.5-scale size
    rows += gradient_memory_case(device, 16)

    print(format_table(rows, COLUMNS + ["max_abs_err", "grad_rel_err"]))
    scored = [r for r in rows if r["provider"] == "dcfast" and "no-grad" in r["case"]]
    headline = next(r for r in scored if r["case"].startswith("16x16") or cuda)
    summary = {
        "speedup_vs_naive": headline["ratio_vs_naive"],
        "speedup_vs_peer": headline["ratio_vs_peer"],
        "min_speedup_vs_peer": min(r["ratio_vs_peer"] for r in scored),
        "max_abs_err": max(r.get("max_abs_err", 0.0) for r in rows),
        "grad_peak_mem_ratio": rows[-1]["mem_ratio"],
        "grad_rel_err": rows[-1]["grad_rel_err"],
    }
    overheads = [r["overhead_vs_bare"] for r in rows if "overhead_vs_bare" in r]
    if overheads:
        summary["max_overhead_vs_bare"] = max(overheads)
    if not quick and not cuda:
        from dcfast.bench.flops import shares_table

        flops = shares_table()
        print(format_table(flops, ["model", "size", "gflop_per_row", "prefix", "text_kv", "self_attn", "conv"]))
        summary["flop_shares"] = flops
    print("(interleaved rounds; median of each; the machine may be shared: compare ratios, not seconds)")
    return {"rows": rows, "summary": summary, "environment": environment(device)}
