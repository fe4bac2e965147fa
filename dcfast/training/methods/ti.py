"""Textual inversion (a control, and a baseline of the paper): each task learns only its token; the U-Net and
its LoRA stay exactly as the base model has them (docs/design.md).

It shows what a token alone can carry. On concepts made of things the base model already draws from words, that
is everything, and nothing is ever forgotten; a continual method that does not beat it there has shown nothing.
"""
from dcfast.training.methods.base import Method, Models


class TextualInversion(Method):
    """L = L_denoise under c_n, minimised over the token <v_n> alone (Gal et al. 2023)."""

    name = "ti"
    trains_lora = False

    def __init__(self, config, models: Models):
        super().__init__(config, models)
        for param in models.lora().values():  # no gradient is even computed for the LoRA: it stays zero
            param.requires_grad_(False)
