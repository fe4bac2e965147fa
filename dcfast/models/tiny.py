"""Tiny Stable-Diffusion-layout models built in code, seeded, with nothing downloaded: tests, the
benchmarks and the shipped base model's pretraining start from them.

The U-Net mirrors SD 1.x's block layout (cross-attention at full resolution first) at toy width; the
tokenizer is a real CLIPTokenizer over a small written vocabulary. `tiny_xl` is the same at SDXL's layout:
two text encoders (the second with a projection, whose pooled output conditions the U-Net with the time ids),
no cross-attention in the first down block, linear projections in the transformers.
"""
from __future__ import annotations

import copy
import json
import math
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TINY_CROSS_ATTENTION_DIM = 32


def tiny_unet(seed: int = 0, sample_size: int = 16, in_channels: int = 4,
              cross_attention_dim: int = TINY_CROSS_ATTENTION_DIM) -> UNet2DConditionModel:
    """A ~1.1M-parameter UNet2DConditionModel, block_out_channels=(32, 64), seeded and in eval mode."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    return unet.eval()


def tiny_scheduler() -> DDPMScheduler:
    """SD 1.x's training scheduler (scaled-linear betas, 1000 steps)."""
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, clip_sample=False)


# Words the tiny tokenizer knows whole, so prompts like "a photo of <v1> dog" tokenize sensibly.
TINY_WORDS = (
    "a an the of in on at with and photo picture image rendering painting drawing close up "
    "dog cat mug cup toy car bird horse person face man woman astronaut coffee rocket chair "
    "table house tree flower red green blue yellow black white small big my style sks"
).split()
TINY_RESOLUTION = 16  # pixels; the tiny VAE halves it to 8x8 latents


def _bytes_to_unicode() -> dict:
    """CLIP's reversible byte -> printable-unicode table (GPT-2 byte-level BPE convention)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def _bpe(word: str, ranks: dict) -> list:
    """Byte-pair encoding of one word as CLIP does it: repeatedly merge the lowest-ranked adjacent pair."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        rank, i = min((ranks.get(pair, math.inf), i) for i, pair in enumerate(zip(pieces, pieces[1:])))
        if rank == math.inf:
            break
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def whole_word_merges(merges: list, words) -> list:
    """Reorder BPE merges so that every word of `words` encodes to one token.

    `write_tiny_tokenizer_files` builds each word's merges left to right, but BPE applies
    the lowest-ranked pair anywhere in a word, so an earlier word's merge can split a later one
    ("at" makes "cat" -> "c" + "at"). Whenever a word takes a wrong merge, move the merge it needed
    just before the wrong one, until no word does.
    """
    merges = list(merges)
    for _ in range(100 * len(words)):
        ranks = {pair: r for r, pair in enumerate(merges)}
        broken = [w for w in words if _bpe(w, ranks) != [w + "</w>"]]
        if not broken:
            return merges
        word = broken[0]
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while True:  # replay: the chain wants (prefix, next) at every step
            wanted = (pieces[0], pieces[1])
            rank, i = min((ranks.get(pair, math.inf), i) for i, pair in enumerate(zip(pieces, pieces[1:])))
            if i != 0:
                merges.remove(wanted)
                merges.insert(rank, wanted)
                break
            pieces[0:2] = [pieces[0] + pieces[1]]
    raise RuntimeError(f"no merge order makes all of {broken} whole tokens")


def write_tiny_tokenizer_files(directory: Union[str, Path], words=TINY_WORDS) -> Path:
    """Write a small CLIP BPE vocab.json/merges.txt: every byte symbol, plus each word built left to right."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    merges = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merge = (pieces[0], pieces[1])
            if merge not in merges:
                merges.append(merge)
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            if pieces[0] not in vocab:
                vocab.append(pieces[0])
    merges = whole_word_merges(merges, words)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return directory


def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIPTokenizer over TINY_WORDS (loaded with from_pretrained: the vocab_file= constructor
    builds a 3-token vocab on transformers 5)."""
    with tempfile.TemporaryDirectory() as directory:
        write_tiny_tokenizer_files(directory)
        return CLIPTokenizer.from_pretrained(directory, model_max_length=77)


def _tiny_text_config(vocab_size: int, eos_token_id: int, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=TINY_CROSS_ATTENTION_DIM, intermediate_size=37,
                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                          eos_token_id=eos_token_id, bos_token_id=eos_token_id - 1, pad_token_id=eos_token_id, **extra)


def tiny_text_encoder(vocab_size: int, eos_token_id: int, seed: int = 0) -> CLIPTextModel:
    """A 2-layer CLIPTextModel with hidden size 32 (= the tiny U-Net's cross_attention_dim)."""
    torch.manual_seed(seed)
    return CLIPTextModel(_tiny_text_config(vocab_size, eos_token_id)).eval()


def tiny_text_encoder_with_projection(vocab_size: int, eos_token_id: int, seed: int = 0) -> CLIPTextModelWithProjection:
    """SDXL's second text encoder at toy size: hidden 32, a projection to 32 (the pooled `text_embeds`)."""
    torch.manual_seed(seed)
    config = _tiny_text_config(vocab_size, eos_token_id, projection_dim=TINY_CROSS_ATTENTION_DIM)
    return CLIPTextModelWithProjection(config).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """A tiny AutoencoderKL: 3 -> 4 latent channels, one 2x downsampling."""
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=8, sample_size=TINY_RESOLUTION).eval()


TINY_XL_TIME_EMBED_DIM = 8  # addition_time_embed_dim (SDXL: 256), for each of the 6 time ids


def tiny_xl_unet(seed: int = 0, sample_size: int = TINY_RESOLUTION // 2) -> UNet2DConditionModel:
    """SDXL's U-Net layout at toy width: DownBlock2D first, cross-attention below, linear projections, and the
    "text_time" added embedding of the pooled text embedding (32) and the 6 time ids."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=2 * TINY_CROSS_ATTENTION_DIM,  # the two encoders' hidden states side by side
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_XL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=TINY_CROSS_ATTENTION_DIM + 6 * TINY_XL_TIME_EMBED_DIM,
        norm_num_groups=32,
    )
    return unet.eval()


def tiny_xl(seed: int = 0, tokenizer: Optional[CLIPTokenizer] = None) -> StableDiffusionXLPipeline:
    """A tiny SDXL-layout pipeline built in code (no downloads): two tokenizers and text encoders, the SDXL
    U-Net layout, a tiny VAE, DDIM. Saves and loads like `tiny()`, with text_encoder_2/ and tokenizer_2/.
    `tokenizer` (default: the tiny one) serves both encoders, e.g. the shipped base's world vocabulary."""
    tokenizer = tokenizer or tiny_tokenizer()
    eos = tokenizer.eos_token_id
    scheduler = DDIMScheduler.from_config(tiny_scheduler().config, steps_offset=1)
    return StableDiffusionXLPipeline(
        vae=tiny_vae(seed), text_encoder=tiny_text_encoder(len(tokenizer), eos, seed=seed),
        text_encoder_2=tiny_text_encoder_with_projection(len(tokenizer), eos, seed=seed + 1),
        tokenizer=tokenizer, tokenizer_2=copy.deepcopy(tokenizer), unet=tiny_xl_unet(seed), scheduler=scheduler,
        force_zeros_for_empty_prompt=True)


def tiny(seed: int = 0) -> StableDiffusionPipeline:
    """A tiny Stable-Diffusion-layout pipeline built in code (no downloads), DDIM for sampling.

    `pipe.save_pretrained(dir)` gives a directory that loads with `load_components(dir)` and with
    `StableDiffusionPipeline.from_pretrained(dir)`. Training reads its scheduler config as DDPM.
    """
    tokenizer = tiny_tokenizer()
    text_encoder = tiny_text_encoder(len(tokenizer), tokenizer.eos_token_id, seed=seed)
    unet = tiny_unet(seed=seed, sample_size=TINY_RESOLUTION // 2)
    scheduler = DDIMScheduler.from_config(tiny_scheduler().config, steps_offset=1)
    return StableDiffusionPipeline(vae=tiny_vae(seed), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
