"""The U-Net's adapter through peft, LoRA (diffusers' `unet.add_adapter`) or VeRA, and its state as plain tensors.

Names are the U-Net's own parameter names (`...attn1.to_q.lora_A.default.weight`, `...to_q.vera_lambda_b.default`),
the same names `dcfast.FisherAccumulator` uses, so Fisher, anchors and teachers are dicts keyed alike. "LoRA" in
the names below stands for the run's adapter, either one: its trained parameters are LoRA's factors lora_A / lora_B,
or VeRA's vectors vera_lambda_b / vera_lambda_d. VeRA's shared random matrices vera_A / vera_B are frozen buffers:
never trained, never in a snapshot, drawn again from the run's seed.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Dict, Iterator, Mapping, Sequence, Tuple

import torch
from peft import LoraConfig, VeraConfig
from peft.tuners.vera import VeraModel

from dcfast.engine.fisher import vera_projections
from dcfast.io.runs import LORA_FILE, PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, save_tensors, write_json

ADAPTER = "default"
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers' key for the adapter config in safetensors metadata
TRAINED = (".lora_A.", ".lora_B.", ".vera_lambda_b.", ".vera_lambda_d.")  # the trained parameters' name parts
# VeRA's start of lambda_d (peft's default, which recommends <= 0.1 after the paper's ablation); lambda_b starts at
# 0, so a fresh VeRA leaves the U-Net as it is.
VERA_D_INITIAL = 0.1


def add_adapter(unet, adapter: str, rank: int, alpha: int, target_modules: Sequence[str], seed: int) -> None:
    """Attach the run's adapter ("lora" or "vera", TrainConfig.adapter) with a seeded init."""
    if adapter == "vera":
        add_vera(unet, rank, target_modules, seed)
    else:
        add_lora(unet, rank, alpha, target_modules, seed)


def add_lora(unet, rank: int, alpha: int, target_modules: Sequence[str], seed: int) -> None:
    """Attach one LoRA adapter (A: kaiming-uniform, B: zeros, peft's default) with a seeded init."""
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(config, adapter_name=ADAPTER)


def add_vera(unet, rank: int, target_modules: Sequence[str], seed: int) -> None:
    """Attach one VeRA adapter (Kopiczko et al.): A (r, largest in) and B (largest out, r) drawn kaiming-uniform from
    `seed` (peft's projection_prng_key), frozen, shared by every target layer and sliced to its shape; per layer the
    trained lambda_d (r) = 0.1 and lambda_b (out) = 0.

    diffusers' `add_adapter` goes through peft's `inject_adapter_in_model`, which refuses VeRA (its shared matrices
    live on the tuner), so peft's VeRA tuner wraps the U-Net's layers in place; each wrapped layer holds the shared
    matrices, so the U-Net needs no wrapper afterwards. peft adapts nn.Linear layers only.
    """
    config = VeraConfig(r=rank, target_modules=list(target_modules), projection_prng_key=seed, save_projection=True,
                        d_initial=VERA_D_INITIAL)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            VeraModel(unet, config, adapter_name=ADAPTER)
        except TypeError as error:  # peft's "Target module ... is not supported" for a convolution
            raise ValueError(f"target_modules: VeRA adapts nn.Linear layers only (peft), and {list(target_modules)} "
                             f"names another kind: {error}; target the attention projections "
                             f"(to_q, to_k, to_v, to_out.0)") from None


# The U-Net's cross-attention key and value projections (diffusers names them attn2.to_k / attn2.to_v)
CROSS_ATTENTION_KV = (".attn2.to_k.", ".attn2.to_v.")


def is_cross_attention_kv(name: str) -> bool:
    """Whether a U-Net parameter name belongs to a cross-attention key or value projection."""
    return any(part in name for part in CROSS_ATTENTION_KV)


def train_cross_attention_kv_only(unet) -> None:
    """Leave only the cross-attention K/V LoRA factors (or VeRA vectors) trainable (the trainer's optimizer takes the
    trainable ones); every other one keeps its start (B = 0, or VeRA's lambda_b = 0: no change to the U-Net)."""
    for name, param in lora_parameters(unet).items():
        param.requires_grad_(is_cross_attention_kv(name))


def lora_parameters(unet) -> Dict[str, torch.nn.Parameter]:
    """The adapter's trained parameters by U-Net parameter name: LoRA's lora_A / lora_B weights, or VeRA's
    vera_lambda_b / vera_lambda_d vectors (never its shared matrices, which are buffers)."""
    return {name: p for name, p in unet.named_parameters() if any(part in name for part in TRAINED)}


def lora_state(unet) -> Dict[str, torch.Tensor]:
    """Detached copies of the adapter's trained parameters (a frozen snapshot: anchors, teachers, checkpoints)."""
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
    """peft adapter layers by module name: LoRA layers (base_layer, lora_A[ADAPTER], lora_B[ADAPTER], scaling) or
    VeRA layers (base_layer, vera_lambda_b[ADAPTER], vera_lambda_d[ADAPTER], the shared vera_A / vera_B)."""
    return {name: m for name, m in unet.named_modules()
            if ADAPTER in getattr(m, "lora_A", {}) or ADAPTER in getattr(m, "vera_lambda_d", {})}


def _is_vera(layer) -> bool:
    return ADAPTER in getattr(layer, "vera_lambda_d", {})


def weight_delta(name: str, layer, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The weight update of adapter layer `name` (a `lora_layers` entry) under the trained tensors `state` (by U-Net
    parameter name; the live parameters give a differentiable one), shaped like its base weight. LoRA: scaling B A
    (a convolution's factors (r, C, kh, kw) and (O, r, 1, 1) multiply as matrices (r, C kh kw) and (O, r)). VeRA:
    diag(lambda_b) B_s diag(lambda_d) A_s, A_s and B_s the shared matrices sliced as peft's forward slices them."""
    weight = layer.base_layer.weight
    if _is_vera(layer):
        a, b = vera_projections(layer, ADAPTER)
        lambda_b, lambda_d = state[f"{name}.vera_lambda_b.{ADAPTER}"], state[f"{name}.vera_lambda_d.{ADAPTER}"]
        return ((lambda_b[:, None] * b) @ (lambda_d[:, None] * a)).view(weight.shape)
    a, b = state[f"{name}.lora_A.{ADAPTER}.weight"], state[f"{name}.lora_B.{ADAPTER}.weight"]
    return (layer.scaling[ADAPTER] * (b.flatten(1) @ a.flatten(1))).view(weight.shape)


def lora_factors(unet, state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """`state` as LoRA factors by lora_A / lora_B parameter names: a LoRA state as it is; a VeRA state as
    A' = diag(lambda_d) A_s and B' = diag(lambda_b) B_s per layer, whose product (scale 1) is its weight update, so
    that updates of VeRA states stack into one diffusers LoRA (C-LoRA's export)."""
    factors = {}
    for name, layer in lora_layers(unet).items():
        if not _is_vera(layer):
            factors.update({k: state[k] for k in (f"{name}.lora_A.{ADAPTER}.weight", f"{name}.lora_B.{ADAPTER}.weight")})
            continue
        a, b = vera_projections(layer, ADAPTER)
        factors[f"{name}.lora_A.{ADAPTER}.weight"] = state[f"{name}.vera_lambda_d.{ADAPTER}"][:, None] * a
        factors[f"{name}.lora_B.{ADAPTER}.weight"] = state[f"{name}.vera_lambda_b.{ADAPTER}"][:, None] * b
    return factors


def reset_lora(unet, seed: int) -> None:
    """A fresh adapter in place, seeded (C-LoRA's next task): LoRA's peft init (A: kaiming-uniform, B: zeros), or
    VeRA's (lambda_d = 0.1, lambda_b = 0; the shared matrices stay). Either leaves the U-Net's function unchanged."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for layer in lora_layers(unet).values():
            if _is_vera(layer):
                layer.reset_vera_parameters(ADAPTER, d_initial=VERA_D_INITIAL)
            else:
                layer.reset_lora_parameters(ADAPTER, True)


def save_adapter(folder: Path, unet, state: Dict[str, torch.Tensor], rank: int, alpha: int,
                 target_modules: Sequence[str]) -> None:
    """Write a task state's adapter into `folder`: LoRA tensors as diffusers' LORA_FILE, VeRA vectors as peft's pair
    PEFT_WEIGHTS_FILE + PEFT_CONFIG_FILE (`vera_files`), which PeftModel.from_pretrained loads."""
    if any(".vera_lambda_" in name for name in state):
        tensors, config = vera_files(unet, state)
        save_tensors(Path(folder) / PEFT_WEIGHTS_FILE, tensors, metadata={"format": "pt"})
        write_json(Path(folder) / PEFT_CONFIG_FILE, config)
    else:
        tensors, metadata = diffusers_lora_file(state, rank, alpha, target_modules)
        save_tensors(Path(folder) / LORA_FILE, tensors, metadata=metadata)


def vera_files(unet, state: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, object]]:
    """Tensors of `adapter_model.safetensors` and the `adapter_config.json` of the U-Net's VeRA with vectors `state`,
    in the layout peft's own save writes and `PeftModel.from_pretrained(unet, folder)` reads: each vector under
    `base_model.model.<parameter name without the adapter name>`, the shared matrices whole as `base_model.vera_A` /
    `base_model.vera_B` (save_projection: the file reproduces the state without the PRNG key, which the config
    also records)."""
    config = unet.peft_config[ADAPTER]
    suffix = f".{ADAPTER}"
    tensors = {"base_model.model." + name[:-len(suffix)]: t.detach().contiguous().cpu()
               for name, t in state.items() if name.endswith(suffix)}
    if len(tensors) != len(state):
        raise ValueError(f"VeRA state names must end with the adapter name {ADAPTER!r}: {sorted(state)[:3]}")
    layer = next(iter(lora_layers(unet).values()))
    tensors["base_model.vera_A"] = layer.vera_A[ADAPTER].detach().contiguous().cpu()
    tensors["base_model.vera_B"] = layer.vera_B[ADAPTER].detach().contiguous().cpu()
    values = config.to_dict()
    values.update(target_modules=sorted(config.target_modules), peft_type=str(config.peft_type.value),
                  inference_mode=True, base_model_name_or_path=None)
    return tensors, values


def diffusers_lora_file(state: Dict[str, torch.Tensor], rank: int, alpha: int,
                        target_modules: Sequence[str]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Tensors and metadata of a `pytorch_lora_weights.safetensors` that `pipe.load_lora_weights` reads.

    Keys become `unet.<module>.lora_A.weight` (the adapter name dropped, as peft's state-dict export
    does); the adapter config goes into the metadata like `save_lora_weights(unet_lora_adapter_metadata=)`.
    """
    tensors = {"unet." + name.replace(f".{ADAPTER}.", "."): t.detach().contiguous().cpu() for name, t in state.items()}
    config = {"unet.r": rank, "unet.lora_alpha": alpha, "unet.target_modules": sorted(target_modules)}
    return tensors, {"format": "pt", LORA_METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}
