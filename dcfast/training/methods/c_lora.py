"""C-LoRA (baseline): a fresh LoRA per task, earlier LoRAs merged into the base weights (docs/design.md).

    L = L_denoise + lambda * sum_layers ||W_past (.) (B_n A_n)||^2,   W_past = sum_{i<n} B_i A_i

(B A includes peft's alpha/r scaling, 1 by default.) Modifier tokens start random (`clora_token_init`), and every
LoRA factor of the run trains (`clora_scope`; "cross_kv": the cross-attention K/V only). The exported LoRA
of task n stacks every task's factors, rank n*r: B_cat A_cat = sum_{i<=n} B_i A_i, so it loads as one
diffusers LoRA on the base model.

With adapter vera, B_n A_n is VeRA's update diag(lambda_b) B diag(lambda_d) A (the shared random A, B sliced to each
layer), each task starts fresh vectors, and the export stacks diag(lambda_d) A and diag(lambda_b) B as LoRA factors
(scale 1): a sum of VeRA updates is no VeRA adapter, but it is this exact LoRA.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

from dcfast.training.adapters import (lora_factors, lora_layers, lora_parameters, lora_state, reset_lora,
                                      train_cross_attention_kv_only, weight_delta)
from dcfast.training.methods.base import Method, Models, TaskData
from dcfast.training.settings import MethodSettings, setting


@dataclass
class CLoRASettings(MethodSettings):
    """C-LoRA's settings."""

    # lambda of ||W_past (.) (B_n A_n)||^2. Its entries are products of two small weights (~3e-3 here; a task's
    # sum ~5e-4), so lambda lives far above EWC's. Chosen on known-same-class-val (benchmarks/methods_tuning.md):
    # final fidelity 0.54 / 0.62 / 0.56 at 1e2 / 1e4 / 1e6.
    clora_lambda: float = setting(1e4, nonnegative=True)
    # Where each task's token starts: "random" (the spec's) or "class_word" (as every other method's). On a world
    # where the token carries part of the concept, a random start handicaps C-LoRA; both are tuned on validation.
    clora_token_init: str = setting("random", choices=("random", "class_word"))
    # Which LoRA factors C-LoRA trains: "all" of the run's target_modules, or "cross_kv", the cross-attention key
    # and value projections only (Smith et al. apply C-LoRA there); the other factors stay zero.
    clora_scope: str = setting("all", choices=("all", "cross_kv"))


class CLoRA(Method):
    """Continual LoRA with the self-regularising overlap penalty."""

    name = "c-lora"
    token_init_setting = "clora_token_init"
    Settings = CLoRASettings

    def __init__(self, config, models: Models):
        super().__init__(config, models)
        self.past: List[Dict[str, torch.Tensor]] = []  # LoRA_1 .. LoRA_{n-1}, merged into the base weights
        self.w_past: Dict[str, torch.Tensor] = {}  # layer name -> sum_{i<n} scaling * B_i A_i
        if self.settings.clora_scope == "cross_kv":
            train_cross_attention_kv_only(models.unet)

    def begin_task(self, task: TaskData) -> None:
        super().begin_task(task)
        if task.index > 1:  # retire the previous task's LoRA: merge it, then start a fresh one
            self._merge(lora_state(self.models.unet))
            reset_lora(self.models.unet, self.config.seed * 1000 + task.index)

    @torch.no_grad()
    def _merge(self, state: Dict[str, torch.Tensor]) -> None:
        self.past.append(state)
        for name, layer in lora_layers(self.models.unet).items():
            delta = weight_delta(name, layer, state)
            layer.base_layer.weight += delta.to(layer.base_layer.weight)
            self.w_past[name] = self.w_past[name] + delta if name in self.w_past else delta

    def penalty(self) -> torch.Tensor:
        """lambda * sum_layers ||W_past (.) (scaling B_n A_n)||^2; zero in the first task."""
        total = torch.zeros((), device=self.task.latents.device)
        live = lora_parameters(self.models.unet)
        for name, layer in lora_layers(self.models.unet).items():
            if name in self.w_past:
                total = total + (self.w_past[name] * weight_delta(name, layer, live)).pow(2).sum()
        return self.settings.clora_lambda * total

    def loss(self, x0: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, float]]:
        denoise, penalty = self.denoise(x0), self.penalty()
        return denoise + penalty, {"denoise": denoise.item(), "penalty": penalty.item()}

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {f"past.{i}.{k}": v for i, lora in enumerate(self.past) for k, v in lora.items()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Re-merge the saved past LoRAs into the (fresh) base weights, in order: bit-identical W."""
        if self.past:
            raise RuntimeError("C-LoRA state can only be loaded into a fresh base model")
        count = len({k.split(".")[1] for k in state})
        for i in range(count):
            self._merge({k[len(f"past.{i}."):]: v for k, v in state.items() if k.startswith(f"past.{i}.")})

    def export_lora(self) -> Tuple[Dict[str, torch.Tensor], int, int]:
        """Every task's LoRA factors stacked (a VeRA state's as `lora_factors`), rank n*r, alpha n*alpha (VeRA: the
        run's alpha is its rank, scale 1)."""
        unet = self.models.unet
        loras = [lora_factors(unet, state) for state in self.past + [lora_state(unet)]]
        stacked = {}
        for name in loras[0]:
            dim = 0 if ".lora_A." in name else 1  # A: (r, in) stacked on rows; B: (out, r) on columns
            stacked[name] = torch.cat([lora[name] for lora in loras], dim=dim)
        n = len(loras)
        return stacked, n * self.config.rank, n * self.config.resolved_lora_alpha()
