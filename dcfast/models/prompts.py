"""Prompts into the conditions every U-Net call of dcfast reads (training, DC scores, sampling, evaluation).

SD 1.x/2.x: one text encoder's last hidden states. SDXL, as diffusers' StableDiffusionXLPipeline encodes a
prompt: both encoders' penultimate hidden states side by side, and the second encoder's projected pooled
output (`text_embeds`), which the U-Net reads with each image's size-and-crop `time_ids`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass
class Conditions:
    """K prompts' conditions: `hidden` (K, L, D) for the cross-attention; for SDXL `pooled` (K, P), else None.

    Indexing selects prompts as a tensor would (`conds[0]` is one prompt's: hidden (L, D), pooled (P,)).
    """

    hidden: torch.Tensor
    pooled: Optional[torch.Tensor] = None

    def __getitem__(self, index) -> "Conditions":
        return Conditions(self.hidden[index], None if self.pooled is None else self.pooled[index])

    @property
    def shape(self) -> torch.Size:
        return self.hidden.shape

    def unet_kwargs(self, rows: int, time_ids: Optional[torch.Tensor] = None) -> dict:
        """Keyword arguments of a plain U-Net call on `rows` rows: one prompt's conditions (hidden (L, D)) for
        every row, or one per row (hidden (rows, L, D)); SDXL also needs `time_ids` (rows, n) or (n,)."""
        hidden = self.hidden if self.hidden.dim() == 3 else self.hidden.expand(rows, -1, -1)
        kwargs = {"encoder_hidden_states": hidden}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled.expand(rows, -1) if self.pooled.dim() == 1
                                           else self.pooled, "time_ids": _time_rows(time_ids, rows)}
        return kwargs

    def engine_kwargs(self, time_ids: Optional[torch.Tensor] = None) -> dict:
        """The DC engine's `added_cond_kwargs` for these K conditions and the pass's images' `time_ids` (B, n)."""
        if self.pooled is None:
            return {}
        return {"added_cond_kwargs": {"text_embeds": self.pooled, "time_ids": _checked_time_ids(time_ids)}}


def _checked_time_ids(time_ids: Optional[torch.Tensor]) -> torch.Tensor:
    if time_ids is None:
        raise ValueError("an SDXL model needs each image's time_ids (original size, crop, target size); none given")
    return time_ids


def _time_rows(time_ids: Optional[torch.Tensor], rows: int) -> torch.Tensor:
    time_ids = _checked_time_ids(time_ids)
    return time_ids.expand(rows, -1) if time_ids.dim() == 1 else time_ids


def as_conditions(cond) -> Conditions:
    """A Conditions as is; a tensor of hidden states as an SD 1.x/2.x model's conditions."""
    return cond if isinstance(cond, Conditions) else Conditions(cond)


def _token_ids(text_encoder, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """The prompts' token ids padded to the tokenizer's model_max_length, on the text encoder's device."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids.to(text_encoder.get_input_embeddings().weight.device)


def encode_prompts(text_encoder, tokenizer, prompts: Sequence[str], dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Encoder hidden states (K, L, D) of K prompts, padded to the tokenizer's model_max_length, in `dtype`
    (default float32, like the latents: a text encoder cast to fp16/bf16 under mixed precision gives its own
    dtype, and autocast casts again). Gradients reach a trainable token embedding where it occurs."""
    return text_encoder(_token_ids(text_encoder, tokenizer, prompts))[0].to(dtype or torch.float32)


def encode_conditions(text_encoder, tokenizer, prompts: Sequence[str], dtype: Optional[torch.dtype] = None,
                      text_encoder_2=None, tokenizer_2=None) -> Conditions:
    """K prompts' Conditions: SD's hidden states, or with a second encoder SDXL's (diffusers' encode_prompt:
    penultimate hidden states of both, concatenated; the second encoder's projected pooled output)."""
    if text_encoder_2 is None:
        return Conditions(encode_prompts(text_encoder, tokenizer, prompts, dtype))
    hidden = []
    for encoder, tok in ((text_encoder, tokenizer), (text_encoder_2, tokenizer_2)):
        out = encoder(_token_ids(encoder, tok, prompts), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
    dtype = dtype or torch.float32
    return Conditions(torch.cat(hidden, dim=-1).to(dtype), out[0].to(dtype))


def sdxl_time_ids(original_size: Sequence[int], crop_top_left: Sequence[int], target_size: Sequence[int]) -> torch.Tensor:
    """SDXL's 6 micro-conditioning ids (original height, width, crop top, left, target height, width), as diffusers'
    SDXL pipelines and DreamBooth-LoRA script build them; float32 (6,)."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)
