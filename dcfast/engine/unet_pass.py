"""The DC pass's U-Net driver: one chunk of rows (b, k, j) with the work shared across concepts done once.

A chunk of the DC engine is a rectangle of nb images x nk concepts x nt (timestep, noise) pairs whose
U-Net rows are ordered (b, k, j), image-major. Three pieces of its work are identical for every concept
of a pair (b, j), and are exact to share:

  "temb"    the time embedding (sinusoid and MLP), once per distinct t of the chunk, gathered per row;
  "kv"      the cross-attention keys and values of the nk concept conditions, once per concept per layer
            (an attention processor installed for the pass only), gathered per row inside the attention;
  "prefix"  everything before the first cross-attention - conv_in, the first resnet, the first
            transformer's norm / proj_in, its first block's self-attention, and norm2 and the query of its
            cross-attention - once per (image, t) pair, broadcast over the nk concepts.

SDXL (a U-Net with addition_embed_type "text_time") adds to the time embedding an embedding of each concept's
pooled text embedding and each image's size-and-crop time ids, so its emb depends on (image, concept, t): "temb"
stays exact as the time part once per distinct t plus the added part once per (image, concept); "kv" is exact
as is (keys and values read only the concept's hidden states); "prefix" is off (its first resnet reads emb, and
SDXL's first down block has no cross-attention to share up to anyway).

`forward_rows` runs the U-Net's own modules (peft LoRA layers inside them included) in diffusers'
UNet2DConditionModel order, so gradients flow as in the plain call. Where a model or a share does not
fit what is mirrored here (another U-Net class, extra embeddings, custom attention processors, gradient
checkpointing under grad, module hooks on shared modules: a hook must see the rows it expects), that
share is off and the plain `unet(x_t, t, encoder_hidden_states=...)` call does the work.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import FrozenSet, Iterable, Tuple

import torch
import torch.nn.functional as F

SHARES = ("prefix", "kv", "temb")


@dataclass(frozen=True)
class Layout:
    """A chunk's rows: nb images x nk concepts x nt pairs, ordered (b, k, j)."""

    nb: int
    nk: int
    nt: int

    @property
    def pairs(self) -> int:
        return self.nb * self.nt

    @property
    def rows(self) -> int:
        return self.nb * self.nk * self.nt

    def pairs_to_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(pairs, ...) ordered (b, j) -> (rows, ...) ordered (b, k, j): each pair repeated for the nk concepts."""
        return x if self.nk == 1 else x.index_select(0, _index(self, "pairs", x.device))

    def concepts_to_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(nk, ...) -> (rows, ...) ordered (b, k, j): each concept repeated for the chunk's pairs."""
        return x if self.pairs == 1 else x.index_select(0, _index(self, "concepts", x.device))

    def add_pairs(self, rows: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        """rows (rows, ...) + pairs (pairs, ...) broadcast over the concepts, without materialising the repeat."""
        tail = rows.shape[1:]
        out = rows.view(self.nb, self.nk, self.nt, *tail) + pairs.view(self.nb, 1, self.nt, *tail)
        return out.view(self.rows, *tail)


_INDEX_CACHE: dict = {}


def _index(layout: Layout, kind: str, device: torch.device) -> torch.Tensor:
    """Row -> pair or row -> concept gather index of a layout (a few distinct layouts per pass: cached)."""
    key = (layout, kind, str(device))
    index = _INDEX_CACHE.get(key)
    if index is None:
        if len(_INDEX_CACHE) > 256:
            _INDEX_CACHE.clear()
        with torch.inference_mode(False):  # a normal tensor: the cache outlives inference-mode passes
            b = torch.arange(layout.nb).view(-1, 1, 1)
            k = torch.arange(layout.nk).view(1, -1, 1)
            j = torch.arange(layout.nt).view(1, 1, -1)
            full = (b * layout.nt + j + 0 * k) if kind == "pairs" else (k + 0 * b + 0 * j)
            index = _INDEX_CACHE[key] = full.reshape(-1).to(device)
    return index


# ------------------------------------------------------------------------------------------------------
# Eligibility: which shares a given U-Net supports.
# ------------------------------------------------------------------------------------------------------

def _default_processor_types():
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    return (AttnProcessor2_0, AttnProcessor)


def _has_hooks(*modules: torch.nn.Module) -> bool:
    """Any forward / backward hook on these modules or below (a hook must see the rows it expects)."""
    for module in modules:
        for m in module.modules():
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
                return True
    return False


def _global_hooks() -> bool:
    from torch.nn.modules import module as nn_module

    return bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks
                or nn_module._global_backward_hooks or nn_module._global_backward_pre_hooks)


def base_unet(unet):
    """The UNet2DConditionModel the driver can run (a peft PeftModel unwrapped), or None."""
    from diffusers import UNet2DConditionModel

    if hasattr(unet, "get_base_model") and not isinstance(unet, UNet2DConditionModel):
        unet = unet.get_base_model()
    if type(unet).forward is not UNet2DConditionModel.forward or not isinstance(unet, UNet2DConditionModel):
        return None
    if hasattr(unet, "_hf_hook") or hasattr(unet, "_diffusers_hook"):  # accelerate/diffusers forward wrappers
        return None
    config = unet.config
    if (unet.class_embedding is not None or config.addition_embed_type not in (None, "text_time")
            or unet.encoder_hid_proj is not None or getattr(unet, "position_net", None) is not None):
        return None
    return unet


def _plain_cross_attention(attn) -> bool:
    """A cross-attention module whose processor is diffusers' default and whose options the shared one mirrors."""
    return (isinstance(attn.processor, _default_processor_types()) and attn.is_cross_attention
            and attn.spatial_norm is None and attn.group_norm is None and not attn.norm_cross
            and attn.norm_q is None and attn.norm_k is None and not attn.residual_connection
            and attn.rescale_output_factor == 1.0 and not getattr(attn, "only_cross_attention", False))


def _cross_attentions(unet):
    from diffusers.models.attention_processor import Attention

    return [m for m in unet.modules() if isinstance(m, Attention) and m.is_cross_attention]


def _first_transformer(unet):
    """(down block 0, its first Transformer2DModel, that model's first BasicTransformerBlock) when the prefix
    is the standard SD layout, else None."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    from diffusers.models.unets.unet_2d_blocks import CrossAttnDownBlock2D

    if not unet.down_blocks:
        return None
    block = unet.down_blocks[0]
    if type(block) is not CrossAttnDownBlock2D or len(block.resnets) != len(block.attentions) or not block.attentions:
        return None
    transformer = block.attentions[0]
    if type(transformer) is not Transformer2DModel or not transformer.is_input_continuous:
        return None
    first = transformer.transformer_blocks[0]
    if (type(first) is not BasicTransformerBlock or first.norm_type != "layer_norm" or first.pos_embed is not None
            or first.only_cross_attention or first.attn2 is None or first._chunk_size is not None
            or not _plain_cross_attention(first.attn2)):
        return None
    return block, transformer, first


def hooked(unet) -> bool:
    """True when a module hook (on the U-Net or global) would see every U-Net call, timing runs included."""
    return _global_hooks() or _has_hooks(unet)


def _checkpointing(unet) -> bool:
    return torch.is_grad_enabled() and any(getattr(m, "gradient_checkpointing", False) for m in unet.modules())


def usable_shares(unet, requested: Iterable[str]) -> FrozenSet[str]:
    """The subset of `requested` shares that this U-Net supports right now (module hooks, grad mode included)."""
    requested = frozenset(requested)
    unknown = requested - set(SHARES)
    if unknown:
        raise ValueError(f"share: unknown {sorted(unknown)}; choose from {SHARES}")
    base = base_unet(unet)
    if not requested or base is None or _global_hooks() or _checkpointing(base):
        return frozenset()
    if base.config.addition_embed_type is not None and _has_hooks(base.add_time_proj, base.add_embedding):
        return frozenset()  # shared, the added embedding runs once per (image, concept): a hook would see fewer rows
    usable = set()
    if "temb" in requested and not _has_hooks(base.time_proj, base.time_embedding):
        usable.add("temb")
    attentions = _cross_attentions(base)
    if ("kv" in requested and attentions and all(_plain_cross_attention(a) for a in attentions)
            and not any(_has_hooks(a) for a in attentions)):
        usable.add("kv")
    if "prefix" in requested and base.config.addition_embed_type is None:  # SDXL: emb depends on the concept
        first = _first_transformer(base)
        if first is not None:
            block, transformer, blk = first
            if not _has_hooks(base.conv_in, block.resnets[0], transformer.norm, transformer.proj_in, blk.norm1,
                              blk.attn1, blk.norm2, blk.attn2):
                usable.add("prefix")
    return frozenset(usable)


# ------------------------------------------------------------------------------------------------------
# Cross-attention with per-concept keys and values.
# ------------------------------------------------------------------------------------------------------

# CPU flash attention (torch 2.13) runs key lengths that are multiples of 16 2-3x faster than others: 8 text
# tokens cost 3x 16, SD's 77 twice 80 (benchmarks/RESULTS.md). Keys and values padded with zeros that a boolean
# mask keeps out of the softmax (exp(-inf) = 0) give the same attention, once per concept per layer.
KEY_BLOCK = 16


def _padded(key: torch.Tensor, value: torch.Tensor):
    """(key, value, mask): keys (n, heads, L, dh) padded to a multiple of KEY_BLOCK on CPU, mask None if not."""
    length = key.shape[-2]
    if key.device.type != "cpu" or length % KEY_BLOCK == 0:
        return key, value, None
    extra = -length % KEY_BLOCK
    mask = torch.ones(length + extra, dtype=torch.bool, device=key.device)
    mask[length:] = False
    return F.pad(key, (0, 0, 0, extra)), F.pad(value, (0, 0, 0, extra)), mask.view(1, 1, 1, -1)


def cross_attention(attn, query: torch.Tensor, cond: torch.Tensor, layout: Layout, *, query_per_pair: bool,
                    kv_per_concept: bool) -> torch.Tensor:
    """diffusers' AttnProcessor2_0 on rows (b, k, j) with the query already projected.

    query: (pairs or rows, N, inner) = attn.to_q(hidden); cond: (nk, L, D) conditions when `kv_per_concept`
    (keys and values projected once per concept, gathered per row), else (rows, L, D).
    """
    heads = attn.heads
    key, value = attn.to_k(cond), attn.to_v(cond)
    inner = key.shape[-1]
    dim = inner // heads
    key, value, mask = _padded(key.view(key.shape[0], -1, heads, dim).transpose(1, 2),
                               value.view(value.shape[0], -1, heads, dim).transpose(1, 2))
    if kv_per_concept:
        key, value = layout.concepts_to_rows(key), layout.concepts_to_rows(value)
    if query_per_pair:
        query = layout.pairs_to_rows(query)
    rows = query.shape[0]
    query = query.view(rows, -1, heads, dim).transpose(1, 2)
    hidden = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
    hidden = hidden.transpose(1, 2).reshape(rows, -1, heads * dim).to(query.dtype)
    return attn.to_out[1](attn.to_out[0](hidden))


class SharedKVProcessor:
    """Cross-attention processor for the DC pass only: `encoder_hidden_states` are the chunk's nk concept
    conditions (nk, L, D), projected to keys and values once per layer and gathered per row (b, k, j)."""

    def __init__(self, layout: Layout):
        self.layout = layout

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if attention_mask is not None or encoder_hidden_states is None:
            raise RuntimeError("SharedKVProcessor: the DC pass passes concept conditions and no attention mask")
        ndim = hidden_states.ndim
        if ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        out = cross_attention(attn, attn.to_q(hidden_states), encoder_hidden_states, self.layout,
                              query_per_pair=False, kv_per_concept=True)
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        return out


class _Installed:
    """Swap the shared-K/V processor into every cross-attention for one chunk; the old ones come back after."""

    def __init__(self, unet, layout: Layout):
        self.attentions = _cross_attentions(unet)
        self.processor = SharedKVProcessor(layout)
        self.saved = []

    def __enter__(self):
        for attn in self.attentions:
            self.saved.append(attn.processor)
            attn.processor = self.processor  # a plain object: no submodule bookkeeping to undo
        return self

    def __exit__(self, *exc):
        for attn, processor in zip(self.attentions, self.saved):
            attn.processor = processor
        return False


# ------------------------------------------------------------------------------------------------------
# The forward pass.
# ------------------------------------------------------------------------------------------------------

def _time_embedding(unet, sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """UNet2DConditionModel's time embedding for `timesteps` (n,), before the added conditions and the activation."""
    probe = sample[:1].expand(timesteps.shape[0], *sample.shape[1:])
    return unet.time_embedding(unet.get_time_embed(sample=probe, timestep=timesteps), None)


def _activated(unet, emb: torch.Tensor) -> torch.Tensor:
    return emb if unet.time_embed_act is None else unet.time_embed_act(emb)


def _added_embedding(unet, added, layout: Layout, dtype: torch.dtype) -> torch.Tensor:
    """SDXL's aug_emb per (image, concept) of the chunk, (nb * nk, E), as UNet2DConditionModel.get_aug_embed
    computes it: add_embedding(concat(text_embeds[k], add_time_proj(time_ids[b]))). Once per (b, k), not per row."""
    text_embeds, time_ids = added
    times = unet.add_time_proj(time_ids.flatten()).reshape(time_ids.shape[0], -1)
    inputs = torch.cat([text_embeds.unsqueeze(0).expand(layout.nb, -1, -1),
                        times.unsqueeze(1).expand(-1, layout.nk, -1)], dim=-1)
    return unet.add_embedding(inputs.reshape(layout.nb * layout.nk, -1).to(dtype))


def _row_embedding(unet, sample: torch.Tensor, t_pairs: torch.Tensor, layout: Layout, added, once_per_t: bool,
                   per_pair: bool):
    """(emb per pair or None, emb per row): the time embedding (once per distinct t, per pair or per row), plus
    SDXL's added embedding per (image, concept) broadcast over the chunk's timesteps, then the activation.

    The per-pair embedding exists only without added conditions (with them, emb depends on the concept)."""
    if once_per_t:
        distinct, inverse = torch.unique(t_pairs, return_inverse=True)
        base_pairs = _time_embedding(unet, sample, distinct).index_select(0, inverse)
    elif per_pair or added is not None:
        base_pairs = _time_embedding(unet, sample, t_pairs)
    else:  # once per row, as the plain call
        return None, _activated(unet, _time_embedding(unet, sample, layout.pairs_to_rows(t_pairs)))
    if added is None:
        emb_pairs = _activated(unet, base_pairs)
        return emb_pairs, layout.pairs_to_rows(emb_pairs)
    aug = _added_embedding(unet, added, layout, base_pairs.dtype).view(layout.nb, layout.nk, 1, -1)
    rows = base_pairs.view(layout.nb, 1, layout.nt, -1) + aug
    return None, _activated(unet, rows.reshape(layout.rows, -1))


def _prefix_block(parts, x: torch.Tensor, emb_pairs: torch.Tensor, emb_rows: torch.Tensor, cond: torch.Tensor,
                  layout: Layout, kv: bool) -> Tuple[torch.Tensor, tuple]:
    """Down block 0 (`parts` = _first_transformer(unet)) with its condition-independent prefix on pairs:
    returns (hidden rows, the block's output states)."""
    block, transformer, first = parts
    hidden = block.resnets[0](x, emb_pairs)
    # Transformer2DModel, continuous input, up to the first block's cross-attention: per pair.
    residual = hidden
    pairs, _, height, width = hidden.shape
    tokens = transformer.norm(hidden)
    if not transformer.use_linear_projection:
        tokens = transformer.proj_in(tokens)
        inner = tokens.shape[1]
        tokens = tokens.permute(0, 2, 3, 1).reshape(pairs, height * width, inner)
    else:
        inner = tokens.shape[1]
        tokens = transformer.proj_in(tokens.permute(0, 2, 3, 1).reshape(pairs, height * width, inner))
    tokens = first.attn1(first.norm1(tokens), encoder_hidden_states=None, attention_mask=None) + tokens
    query = first.attn2.to_q(first.norm2(tokens))
    # From the cross-attention on: per row (b, k, j).
    attended = cross_attention(first.attn2, query, cond, layout, query_per_pair=True, kv_per_concept=kv)
    tokens = layout.add_pairs(attended, tokens)
    tokens = first.ff(first.norm3(tokens)) + tokens
    enc = cond
    for blk in transformer.transformer_blocks[1:]:
        tokens = blk(tokens, attention_mask=None, encoder_hidden_states=enc, encoder_attention_mask=None,
                     timestep=None, cross_attention_kwargs=None, class_labels=None)
    rows = layout.rows
    if not transformer.use_linear_projection:
        tokens = tokens.reshape(rows, height, width, inner).permute(0, 3, 1, 2).contiguous()
        tokens = transformer.proj_out(tokens)
    else:
        tokens = transformer.proj_out(tokens)
        tokens = tokens.reshape(rows, height, width, inner).permute(0, 3, 1, 2).contiguous()
    hidden = layout.add_pairs(tokens, residual)
    states = (hidden,)
    for resnet, attn in zip(block.resnets[1:], block.attentions[1:]):
        hidden = resnet(hidden, emb_rows)
        hidden = attn(hidden, encoder_hidden_states=enc, cross_attention_kwargs=None, attention_mask=None,
                      encoder_attention_mask=None, return_dict=False)[0]
        states += (hidden,)
    if block.downsamplers is not None:
        for downsampler in block.downsamplers:
            hidden = downsampler(hidden)
        states += (hidden,)
    return hidden, states


def forward_rows(unet, x_pairs: torch.Tensor, t_pairs: torch.Tensor, cond: torch.Tensor, layout: Layout,
                 shares: FrozenSet[str], added=None) -> torch.Tensor:
    """U-Net outputs (rows, C, H, W), rows (b, k, j), for noised inputs x_pairs (pairs, C, H, W) ordered (b, j),
    their timesteps t_pairs (pairs,) and the chunk's concept conditions cond (nk, L, D); for an SDXL U-Net,
    `added` = (text_embeds (nk, P), time_ids (nb, n)) of the chunk's concepts and images.

    `shares` must come from `usable_shares(unet, ...)`; empty: the plain U-Net call on gathered rows.
    """
    if not shares:
        kwargs = {}
        if added is not None:
            text_embeds, time_ids = added
            kwargs["added_cond_kwargs"] = {
                "text_embeds": layout.concepts_to_rows(text_embeds),
                "time_ids": layout.pairs_to_rows(time_ids.repeat_interleave(layout.nt, dim=0))}
        return unet(layout.pairs_to_rows(x_pairs), layout.pairs_to_rows(t_pairs),
                    encoder_hidden_states=layout.concepts_to_rows(cond), return_dict=False, **kwargs)[0]
    unet = base_unet(unet)
    prefix, kv = "prefix" in shares, "kv" in shares
    sample = 2 * x_pairs - 1.0 if unet.config.center_input_sample else x_pairs
    emb_pairs, emb_rows = _row_embedding(unet, sample, t_pairs, layout, added, once_per_t="temb" in shares,
                                         per_pair=prefix)
    enc = cond if kv else layout.concepts_to_rows(cond)
    parts = _first_transformer(unet) if prefix else None  # before the shared processors replace the default ones

    with (_Installed(unet, layout) if kv else _nothing()):
        if prefix:
            first = unet.conv_in(sample)
            hidden, states = _prefix_block(parts, first, emb_pairs, emb_rows, enc, layout, kv)
            res_samples = (layout.pairs_to_rows(first),) + states
            down_blocks = unet.down_blocks[1:]
        else:
            hidden = unet.conv_in(layout.pairs_to_rows(sample))
            res_samples = (hidden,)
            down_blocks = unet.down_blocks
        for block in down_blocks:
            if getattr(block, "has_cross_attention", False):
                hidden, states = block(hidden_states=hidden, temb=emb_rows, encoder_hidden_states=enc,
                                       attention_mask=None, cross_attention_kwargs=None, encoder_attention_mask=None)
            else:
                hidden, states = block(hidden_states=hidden, temb=emb_rows)
            res_samples += states
        if unet.mid_block is not None:
            if getattr(unet.mid_block, "has_cross_attention", False):
                hidden = unet.mid_block(hidden, emb_rows, encoder_hidden_states=enc, attention_mask=None,
                                        cross_attention_kwargs=None, encoder_attention_mask=None)
            else:
                hidden = unet.mid_block(hidden, emb_rows)
        factor = 2 ** unet.num_upsamplers
        forward_upsample_size = any(size % factor != 0 for size in x_pairs.shape[-2:])
        upsample_size = None
        for i, block in enumerate(unet.up_blocks):
            last = i == len(unet.up_blocks) - 1
            skips = res_samples[-len(block.resnets):]
            res_samples = res_samples[:-len(block.resnets)]
            if not last and forward_upsample_size:
                upsample_size = res_samples[-1].shape[2:]
            if getattr(block, "has_cross_attention", False):
                hidden = block(hidden_states=hidden, temb=emb_rows, res_hidden_states_tuple=skips,
                               encoder_hidden_states=enc, cross_attention_kwargs=None, upsample_size=upsample_size,
                               attention_mask=None, encoder_attention_mask=None)
            else:
                hidden = block(hidden_states=hidden, temb=emb_rows, res_hidden_states_tuple=skips,
                               upsample_size=upsample_size)
        if unet.conv_norm_out:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        return unet.conv_out(hidden)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
