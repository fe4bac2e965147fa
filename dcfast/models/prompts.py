"""Prompts into a text encoder's hidden states: the conditions every U-Net call of dcfast reads (training,
DC scores, sampling, evaluation)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def encode_prompts(text_encoder, tokenizer, prompts: Sequence[str], dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Encoder hidden states (K, L, D) of K prompts, padded to the tokenizer's model_max_length, in `dtype`
    (default float32, like the latents: a text encoder cast to fp16/bf16 under mixed precision gives its own
    dtype, and autocast casts again). Gradients reach a trainable token embedding where it occurs."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    device = text_encoder.get_input_embeddings().weight.device
    return text_encoder(ids.to(device))[0].to(dtype or torch.float32)
