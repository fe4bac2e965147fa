"""LoRA on the U-Net through peft (diffusers' `unet.add_adapter`), and its state as plain tensors.

Names are the U-Net's own parameter names (`...attn1.to_q.lora_A.default.weight`), the same names
`dcfast.FisherAccumulator` uses, so Fisher, anchors and teachers are dicts keyed alike.
"""
from __future__ import annotations

import contextlib
import json
from typing import Dict, Iterator, Sequence, Tuple

import torch
from peft import LoraConfig

ADAPTER = "default"
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers' key for the adapter config in safetensors metadata


def add_lora(unet, rank: int, alpha: int, target_modules: Sequence[str], seed: int) -> None:
    """Attach one LoRA adapter (A: kaiming-uniform, B: zeros, peft's default) with a seeded init."""
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(config, adapter_name=ADAPTER)


# The U-Net's cross-attention key and value projections (diffusers names them attn2.to_k / attn2.to_v)
CROSS_ATTENTION_KV = (".attn2.to_k.", ".attn2.to_v.")


def is_cross_attention_kv(name: str) -> bool:
    """Whether a U-Net parameter name belongs to a cross-attention key or value projection."""
    return any(part in name for part in CROSS_ATTENTION_KV)


def train_cross_attention_kv_only(unet) -> None:
    """Leave only the cross-attention K/V LoRA factors trainable (the trainer's optimizer takes the trainable ones);
    every other factor keeps its start (B = 0: no change to the U-Net)."""
    for name, param in lora_parameters(unet).items():
        param.requires_grad_(is_cross_attention_kv(name))


def lora_parameters(unet) -> Dict[str, torch.nn.Parameter]:
    """The LoRA parameters by U-Net parameter name (lora_A / lora_B weights)."""
    return {name: p for name, p in unet.named_parameters() if ".lora_A." in name or ".lora_B." in name}


def lora_state(unet) -> Dict[str, torch.Tensor]:
    """Detached copies of the LoRA weights (a frozen snapshot: anchors, teachers, checkpoints)."""
    return {name: p.detach().clone() for name, p in lora_parameters(unet).items()}


@torch.no_grad()
def load_lora_state(unet, state: Dict[str, torch.Tensor]) -> None:
    """Copy a snapshot back into the live LoRA weights; names must match exactly."""
    params = lora_parameters(unet)
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ValueError(f"LoRA state does not match the U-Net's adapter: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, p in params.items():
        p.copy_(state[name])


@contextlib.contextmanager
def swapped_lora(unet, state: Dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily run the U-Net with another LoRA (a frozen teacher); the live weights come back after."""
    live = lora_state(unet)
    load_lora_state(unet, state)
    try:
        yield
    finally:
        load_lora_state(unet, live)


def lora_layers(unet) -> Dict[str, torch.nn.Module]:
    """peft LoRA layers by module name (each has base_layer, lora_A[ADAPTER], lora_B[ADAPTER], scaling)."""
    return {name: m for name, m in unet.named_modules() if hasattr(m, "lora_A") and ADAPTER in getattr(m, "lora_A", {})}


def diffusers_lora_file(state: Dict[str, torch.Tensor], rank: int, alpha: int,
                        target_modules: Sequence[str]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Tensors and metadata of a `pytorch_lora_weights.safetensors` that `pipe.load_lora_weights` reads.

    Keys become `unet.<module>.lora_A.weight` (the adapter name dropped, as peft's state-dict export
    does); the adapter config goes into the metadata like `save_lora_weights(unet_lora_adapter_metadata=)`.
    """
    tensors = {"unet." + name.replace(f".{ADAPTER}.", "."): t.detach().contiguous().cpu() for name, t in state.items()}
    config = {"unet.r": rank, "unet.lora_alpha": alpha, "unet.target_modules": sorted(target_modules)}
    return tensors, {"format": "pt", LORA_METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}
