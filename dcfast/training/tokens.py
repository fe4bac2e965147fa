"""Modifier tokens <v_i>: one new token per task, trained in its task only, frozen afterwards.

During its task the token's embedding is a separate (1, D) parameter spliced into the text encoder's
input embeddings by a forward hook, so the embedding table itself stays frozen (no gradient masking,
no optimizer state for the whole table, other rows bit-identical). `freeze()` writes it into the table.
"""
from __future__ import annotations

from typing import List, Optional

import torch


def add_token(tokenizer, text_encoder, token: str) -> int:
    """Add `token` to the tokenizer and a row to the text encoder's embeddings; returns its id."""
    if tokenizer.add_tokens(token) != 1:
        raise ValueError(f"token {token!r} is already in the tokenizer's vocabulary; choose another token_template")
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the row is set right after
    return tokenizer.convert_tokens_to_ids(token)


def class_word_embedding(tokenizer, text_encoder, class_word: str) -> torch.Tensor:
    """The class word's input embedding (D,); the mean of its pieces when it is several tokens."""
    ids = tokenizer(class_word, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"class word {class_word!r} tokenizes to nothing")
    return text_encoder.get_input_embeddings().weight[ids].detach().mean(0)


def random_embedding(text_encoder, generator: torch.Generator) -> torch.Tensor:
    """A random (D,) embedding at the scale of the existing table (C-LoRA's random token init)."""
    table = text_encoder.get_input_embeddings().weight.detach()
    noise = torch.randn(table.shape[1], generator=generator)
    return noise.to(table) * table.std()


class ModifierToken:
    """The current task's trainable token: `param` (1, D) replaces the table row wherever the id occurs."""

    def __init__(self, text_encoder, token: str, token_id: int, init: torch.Tensor):
        self.token, self.token_id, self.text_encoder = token, token_id, text_encoder
        embeddings = text_encoder.get_input_embeddings()
        # fp32 even when the table is fp16/bf16 (mixed precision casts the frozen text encoder, not what trains)
        self.param = torch.nn.Parameter(init.detach().clone().view(1, -1).to(embeddings.weight.device, torch.float32))
        self._hook: Optional[torch.utils.hooks.RemovableHandle] = embeddings.register_forward_hook(self._splice)

    def _splice(self, module, inputs, output):
        mask = (inputs[0] == self.token_id).unsqueeze(-1)
        return torch.where(mask, self.param.to(output.dtype), output)

    @torch.no_grad()
    def freeze(self) -> torch.Tensor:
        """Write the learned embedding into the table, remove the hook; returns the (D,) embedding."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.text_encoder.get_input_embeddings().weight[self.token_id] = self.param[0]
        return self.param[0].detach().clone()


def set_embedding(text_encoder, token_id: int, embedding: torch.Tensor) -> None:
    """Overwrite one row of the embedding table (restoring a frozen token on resume)."""
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight[token_id] = embedding


def add_task_tokens(pairs, token: str, class_word: str,
                    generator: Optional[torch.Generator] = None) -> List[ModifierToken]:
    """A task's <v_i> in each (tokenizer, text encoder) pair of the model (SDXL: both, each from the class word's
    embedding in that encoder, as diffusers' SDXL textual-inversion script does); with `generator`, random
    starts instead (C-LoRA), drawn encoder after encoder."""
    tokens = []
    for tokenizer, text_encoder in pairs:
        token_id = add_token(tokenizer, text_encoder, token)
        init = (random_embedding(text_encoder, generator) if generator is not None
                else class_word_embedding(tokenizer, text_encoder, class_word))
        tokens.append(ModifierToken(text_encoder, token, token_id, init))
    return tokens
