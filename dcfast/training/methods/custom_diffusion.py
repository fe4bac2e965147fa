"""Custom Diffusion (Kumari et al. 2023), a baseline of the paper: each task fine-tunes the cross-attention key and
value projections, where the text condition enters the U-Net, and its own token; one concept after another, nothing
consolidated between tasks.

Kumari et al. fine-tune those projections' full weights; here they move through the run's LoRA on them (rank
`rank`), so that every task state saves, loads, exports and is evaluated as every other method's. Every other LoRA
factor stays where it starts (B = 0, or VeRA's lambda_b = 0: the rest of the U-Net is the base model's). Their prior-preservation images
(real photos of the class) are left out: the setting keeps no data beside the task's own photos.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

from dcfast.training.adapters import train_cross_attention_kv_only
from dcfast.training.methods.base import Method, Models
from dcfast.training.settings import MethodSettings

KV_MODULES = ("to_k", "to_v")  # the target_modules it needs


@dataclass
class CustomDiffusionSettings(MethodSettings):
    """No settings of its own; it needs the run's LoRA on the key and value projections."""

    def problems(self, config) -> List[str]:
        missing = [m for m in KV_MODULES if m not in config.target_modules]
        if missing:
            return [f"target_modules: custom-diffusion trains the cross-attention {' and '.join(missing)} "
                    f"projections, which the LoRA does not cover ({config.target_modules}); add {missing}"]
        return []


class CustomDiffusion(Method):
    """L = L_denoise under c_n, minimised over <v_n> and the cross-attention K/V LoRA factors only."""

    name = "custom-diffusion"
    Settings = CustomDiffusionSettings

    def __init__(self, config, models: Models):
        super().__init__(config, models)
        train_cross_attention_kv_only(models.unet)
