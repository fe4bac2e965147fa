"""FLOP shares of one U-Net row: what the DC engine's shares can save (benchmarks/RESULTS.md).

Counted analytically from module hooks (2 FLOPs per multiply-add): every nn.Conv2d, every nn.Linear
(peft LoRA factors included), and the two matmuls of every attention (QK^T and AV: 4 * Nq * Nk * inner).
Norms, activations and additions are not counted. Runs on the meta device, so SD 1.5's config costs
no memory and no time.

Categories (a module can sit in two: the prefix holds a convolution and a self-attention):
    prefix      conv_in, the first resnet, the first transformer's proj_in, its first block's self-attention
                and cross-attention query, the time embedding: what "prefix" computes once per (image, t)
    text_kv     the cross-attention key/value projections of the text: what "kv" computes once per concept
    self_attn   every self-attention (projections and matmuls)
    conv        every convolution (resnets, samplers, conv_in/out, conv proj_in/out)
"""
from __future__ import annotations

from typing import Dict, Optional

import torch


def _attention_modules(unet):
    from diffusers.models.attention_processor import Attention

    return {name: m for name, m in unet.named_modules() if isinstance(m, Attention)}


def _added_conditions(config, device, dtype) -> Optional[Dict[str, torch.Tensor]]:
    """Zero pooled text embedding and time ids for an SDXL ("text_time") U-Net's one row, else None."""
    if config.addition_embed_type != "text_time":
        return None
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return {"text_embeds": torch.zeros(1, pooled, device=device, dtype=dtype),
            "time_ids": torch.zeros(1, 6, device=device, dtype=dtype)}


def row_flops(unet, size: int, tokens: int) -> Dict[str, float]:
    """FLOPs of one U-Net row at size x size latents and `tokens` text tokens, by category (see module doc)."""
    flops: Dict[str, float] = {}
    handles = []

    def add(name: str, value: float) -> None:
        flops[name] = flops.get(name, 0.0) + value

    def conv_hook(name):
        def hook(module, args, output):
            kh, kw = module.kernel_size
            add(name, 2.0 * output.numel() * module.in_channels // module.groups * kh * kw)
        return hook

    def linear_hook(name):
        def hook(module, args, output):
            add(name, 2.0 * args[0].numel() // module.in_features * module.in_features * module.out_features)
        return hook

    def attention_hook(name):
        def hook(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            context = kwargs.get("encoder_hidden_states")
            queries = hidden.shape[1] if hidden.dim() == 3 else hidden.shape[2] * hidden.shape[3]
            keys = queries if context is None else context.shape[1]
            add(name + ".sdpa", 4.0 * hidden.shape[0] * queries * keys * module.inner_dim)
        return hook

    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook(name)))
        elif isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_hook(linear_hook(name)))
    for name, module in _attention_modules(unet).items():
        handles.append(module.register_forward_hook(attention_hook(name), with_kwargs=True))
    try:
        device = next(unet.parameters()).device
        dtype = next(unet.parameters()).dtype
        config = unet.config
        with torch.no_grad():
            unet(torch.zeros(1, config.in_channels, size, size, device=device, dtype=dtype),
                 torch.tensor([500], device=device),
                 encoder_hidden_states=torch.zeros(1, tokens, config.cross_attention_dim, device=device, dtype=dtype),
                 added_cond_kwargs=_added_conditions(config, device, dtype))
    finally:
        for handle in handles:
            handle.remove()
    return _categorise(unet, flops)


def text_flops(encoder, tokens: int) -> float:
    """FLOPs of one prompt of `tokens` tokens through a CLIP text encoder: its linear layers (hooks, as `row_flops`)
    and each layer's two attention matmuls, 4 * tokens^2 * hidden. Every layer runs, also where the U-Net reads an
    earlier one's states (SDXL's penultimate)."""
    total = [0.0]

    def hook(module, args, output):
        total[0] += 2.0 * args[0].numel() // module.in_features * module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in encoder.modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            encoder(torch.zeros(1, tokens, dtype=torch.long, device=next(encoder.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
    config = encoder.config
    return total[0] + 4.0 * tokens * tokens * config.hidden_size * config.num_hidden_layers


def _categorise(unet, flops: Dict[str, float]) -> Dict[str, float]:
    attentions = _attention_modules(unet)
    first = "down_blocks.0.attentions.0.transformer_blocks.0"
    prefix_roots = ("conv_in", "time_embedding", "down_blocks.0.resnets.0", "down_blocks.0.attentions.0.proj_in",
                    f"{first}.attn1", f"{first}.attn2.to_q")
    total = sum(flops.values())
    out = {"total": total, "prefix": 0.0, "text_kv": 0.0, "self_attn": 0.0, "conv": 0.0}
    convs = {name for name, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d)}
    for name, value in flops.items():
        base = name[:-len(".sdpa")] if name.endswith(".sdpa") else name
        owner = next((a for a in attentions if base == a or base.startswith(a + ".")), None)
        if any(base == r or base.startswith(r + ".") for r in prefix_roots):
            out["prefix"] += value
        if owner is not None and attentions[owner].is_cross_attention and (".to_k" in base or ".to_v" in base):
            out["text_kv"] += value
        if owner is not None and not attentions[owner].is_cross_attention:
            out["self_attn"] += value
        if base in convs or any(base.startswith(c + ".") for c in convs):
            out["conv"] += value
    return out


def sd15_meta_unet():
    """SD 1.5's UNet2DConditionModel (`dcfast.models.architectures`) on the meta device (no weights, no memory)."""
    from dcfast.models.architectures import build_unet

    return build_unet("sd15", device="meta")


def shares_table(sizes=(8, 16, 32, 64)):
    """Rows {model, size, gflop_per_row, prefix, text_kv, self_attn, conv (fractions)} for the tiny U-Net and SD 1.5."""
    from dcfast.models.tiny import tiny_unet

    rows = []
    with torch.device("meta"):
        tiny = tiny_unet(seed=0)
    for model_name, unet, tokens in (("tiny", tiny, 8), ("sd15", sd15_meta_unet(), 77)):
        for size in sizes:
            counts = row_flops(unet, size, tokens)
            total = counts["total"]
            rows.append({"model": model_name, "size": size, "gflop_per_row": total / 1e9,
                         **{k: counts[k] / total for k in ("prefix", "text_kv", "self_attn", "conv")}})
    return rows
