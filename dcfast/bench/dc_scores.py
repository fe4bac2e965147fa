"""`dcfast bench dc-scores`: the batched engine vs the naive loop (one U-Net call per concept and timestep).

Also measures the memory-bounded gradient (`dc_loss_backward`) against the unchunked backward at
K*T = 64 rows per image. CPU uses the tiny U-Net; CUDA a randomly initialised U-Net with Stable
Diffusion 1.5's exact config at 64x64 latents in fp16 (the real cost, no download).
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F

from dcfast.bench.common import environment, format_table, median_time, peak_memory
from dcfast.models import tiny_scheduler, tiny_unet
from dcfast.reference import dc_scores_naive
from dcfast.scores import dc_logits, dc_loss_backward, dc_scores

COLUMNS = ["case", "provider", "median_s", "ratio_vs_naive", "peak_mem_mb", "mem_ratio"]
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


def _scores_case(unet, scheduler, problem, label: str, device: str, repeats: int, grad: bool) -> List[Dict]:
    x0, cond, noise, timesteps = problem
    labels = torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device)

    def call(engine):
        def run():
            if not grad:
                with torch.no_grad():
                    return engine(unet, scheduler, x0, cond, timesteps=timesteps, noise=noise)
            err = engine(unet, scheduler, x0, cond, timesteps=timesteps, noise=noise)
            F.cross_entropy(dc_logits(err.float()), labels).backward()
            unet.zero_grad(set_to_none=True)
            return err.detach()
        return run

    rows = []
    for name, engine in (("naive", dc_scores_naive), ("dcfast", dc_scores)):
        seconds = median_time(call(engine), repeats, device)
        result, peak = peak_memory(call(engine), device)
        rows.append({"case": label, "provider": name, "median_s": seconds, "peak_mem_mb": peak / 2**20,
                     "result": result.float()})
    naive, fused = rows
    for row in rows:
        row["ratio_vs_naive"] = naive["median_s"] / row["median_s"]
        row["mem_ratio"] = row["peak_mem_mb"] / max(naive["peak_mem_mb"], 1e-9)
    fused["max_abs_err"] = (fused.pop("result") - naive.pop("result")).abs().max().item()
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
    """Run the DC-score benchmark, print its table, and return rows plus the headline numbers."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    scheduler = tiny_scheduler()
    B, K, T = SHAPE
    sizes = [16] if quick else [16, 32]
    modes = [False] if quick else [False, True]
    repeats = 3 if quick else 5
    rows: List[Dict] = []
    for size in sizes:
        unet, dtype, latent, dim, tokens = _model(device, size)
        problem = make_problem(B, K, T, latent, unet.config.in_channels, dim, tokens, dtype, device)
        for grad in modes:
            label = f"{latent}x{latent} B={B} K={K} T={T} {'grad' if grad else 'no-grad'}"
            rows += _scores_case(unet, scheduler, problem, label, device, repeats, grad)
        if torch.device(device).type == "cuda":
            break  # one SD 1.5-scale size
    rows += gradient_memory_case(device, 16)

    headline = rows[1]  # first case, dcfast row: no grad at the smallest size
    print(format_table(rows, COLUMNS + ["max_abs_err", "grad_rel_err"]))
    summary = {
        "speedup_vs_naive": headline["ratio_vs_naive"],
        "max_abs_err": max(r.get("max_abs_err", 0.0) for r in rows),
        "grad_peak_mem_ratio": rows[-1]["mem_ratio"],
        "grad_rel_err": rows[-1]["grad_rel_err"],
    }
    return {"rows": rows, "summary": summary, "environment": environment(device)}
