"""`dcfast bench fisher`: the per-sample Fisher of a LoRA U-Net three ways, N = 16 samples.

    naive    dcfast.engine.reference.fisher_naive: one forward + backward per sample (the usual EWC loop)
    vmap     dcfast.engine.reference.fisher_vmap: torch.func vmap(grad), all per-sample gradients in memory
    dcfast   dcfast.FisherAccumulator: one batched forward + backward, squares fused in place

Loss: the denoising loss ||eps - eps_theta(x_t, c, t)||^2 per sample. LoRA rank 4 on the attention
projections (to_q, to_k, to_v, to_out.0), lora_B drawn non-zero so every factor has a gradient.
CPU: the tiny U-Net at 16x16 and 32x32 latents (quick: 16x16 only). CUDA: a randomly initialised
U-Net with Stable Diffusion 1.5's config at 64x64 latents, float32 with TF32 off (the comparison is
to 1e-5).
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch
from peft import LoraConfig

from dcfast.bench.common import environment, format_table, median_time, peak_memory
from dcfast.engine.fisher import FisherAccumulator
from dcfast.models.tiny import tiny_scheduler, tiny_unet
from dcfast.engine.reference import fisher_naive, fisher_vmap

N = 16
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
COLUMNS = ["case", "provider", "median_s", "ratio_vs_naive", "peak_mem_mb", "mem_ratio_vs_vmap", "max_rel_err"]


def lora_unet(device: str, size: int):
    """(U-Net with a rank-4 LoRA whose lora_B is non-zero, latent size, text width, tokens)."""
    if torch.device(device).type == "cuda":
        from dcfast.bench.dc_scores import sd15_unet

        unet, size, dim, tokens = sd15_unet(torch.float32, device), 64, 768, 77
    else:
        unet, dim, tokens = tiny_unet(seed=0, sample_size=size), 32, 8
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return unet, size, dim, tokens


def denoise_losses(alphas: torch.Tensor) -> Callable:
    """losses(forward, x0, noise, t, text) -> (B,) per-sample denoising losses."""

    def losses(forward, x0, noise, t, text):
        a = alphas[t].view(-1, 1, 1, 1)
        pred = forward(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, encoder_hidden_states=text).sample
        return (pred - noise).square().mean((1, 2, 3))

    return losses


def providers(unet, losses: Callable, samples) -> Dict[str, Callable[[], Dict[str, torch.Tensor]]]:
    """name -> a call computing {parameter name: Fisher} over the N samples."""

    def naive():
        return fisher_naive(unet, lambda n: losses(unet, *(s[n:n + 1] for s in samples)).sum(), N)

    def vmap():
        return fisher_vmap(unet, losses, samples)

    def fused():
        acc = FisherAccumulator(unet)
        with acc.track(num_samples=N):
            losses(unet, *samples).sum().backward()
        unet.zero_grad(set_to_none=True)
        return acc.fisher

    return {"naive": naive, "vmap": vmap, "dcfast": fused}


def rel_err(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor]) -> float:
    """max over parameters of ||got - want|| / ||want|| (float64)."""
    return max(((got[n].double() - want[n].double()).norm() / want[n].double().norm()).item() for n in want)


def case(device: str, size: int, repeats: int) -> List[Dict]:
    """Rows of one latent size: time, peak memory and error of every provider."""
    unet, size, dim, tokens = lora_unet(device, size)
    gen = torch.Generator().manual_seed(0)
    channels = unet.config.in_channels
    samples = tuple(s.to(device) for s in (
        torch.randn(N, channels, size, size, generator=gen), torch.randn(N, channels, size, size, generator=gen),
        torch.randint(0, 1000, (N,), generator=gen), torch.randn(N, tokens, dim, generator=gen)))
    calls = providers(unet, denoise_losses(tiny_scheduler().alphas_cumprod.to(device)), samples)
    label = f"{size}x{size} N={N}"
    rows, results = [], {}
    for name, call in calls.items():
        seconds = median_time(call, repeats, device)
        results[name], peak = peak_memory(call, device)
        rows.append({"case": label, "provider": name, "median_s": seconds, "peak_mem_mb": peak / 2**20})
    by_name = {row["provider"]: row for row in rows}
    for row in rows:
        row["ratio_vs_naive"] = by_name["naive"]["median_s"] / row["median_s"]
        row["mem_ratio_vs_vmap"] = row["peak_mem_mb"] / max(by_name["vmap"]["peak_mem_mb"], 1e-9)
        if row["provider"] != "naive":
            row["max_rel_err"] = rel_err(results[row["provider"]], results["naive"])
    return rows


def run(quick: bool = False, device: str = "cpu") -> Dict[str, object]:
    """Run the Fisher benchmark, print its table, and return rows, summary and environment.

    The summary takes the worst case over sizes: the smallest speedup and error margin, the largest
    memory ratio.
    """
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    cuda = torch.device(device).type == "cuda"
    sizes = [64] if cuda else ([16] if quick else [16, 32])
    repeats = 1 if quick else 3
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # TF32 convolutions alone differ by ~1e-3 between batch sizes
    try:
        rows = [row for size in sizes for row in case(device, size, repeats)]
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    print(format_table(rows, COLUMNS))
    fused = [row for row in rows if row["provider"] == "dcfast"]
    summary = {
        "speedup_vs_naive": min(row["ratio_vs_naive"] for row in fused),
        "max_rel_err": max(row["max_rel_err"] for row in fused),
        "peak_mem_ratio_vs_vmap": max(row["mem_ratio_vs_vmap"] for row in fused),
    }
    return {"rows": rows, "summary": summary, "environment": environment(device), **summary}
