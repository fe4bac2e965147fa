"""Sequential LoRA (baseline): one LoRA carried from task to task, plain denoising loss (docs/design.md)."""
from dcfast.training.methods.base import Method


class SequentialLoRA(Method):
    """L = L_denoise under c_n; nothing is consolidated between tasks."""

    name = "lora"
