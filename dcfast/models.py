"""Models: the tiny Stable-Diffusion-layout components built in code (tests, demo, benchmarks), and
loading a local diffusers directory or a Hub id already in the local cache (nothing is downloaded).

The U-Net mirrors SD 1.x's block layout (cross-attention at full resolution first) at toy width.
"""
from __future__ import annotations

import hashlib
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

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


# ---------------------------------------------------------------------------------------------
# The tiny Stable-Diffusion-layout pipeline, and loading a local diffusers directory.
# ---------------------------------------------------------------------------------------------

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


def tiny_text_encoder(vocab_size: int, eos_token_id: int, seed: int = 0) -> CLIPTextModel:
    """A 2-layer CLIPTextModel with hidden size 32 (= the tiny U-Net's cross_attention_dim)."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=TINY_CROSS_ATTENTION_DIM, intermediate_size=37,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                            eos_token_id=eos_token_id, bos_token_id=eos_token_id - 1, pad_token_id=eos_token_id)
    return CLIPTextModel(config).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """A tiny AutoencoderKL: 3 -> 4 latent channels, one 2x downsampling."""
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=8, sample_size=TINY_RESOLUTION).eval()


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


@dataclass
class Components:
    """The parts training needs; `vae` is None for a pixel-space model."""

    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    vae: Optional[AutoencoderKL] = None
    fingerprint: Optional[str] = None  # model_fingerprint of the directory it was read from

    @property
    def vae_scale_factor(self) -> int:
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """Image side length the model was built for: U-Net sample size times the VAE's downsampling."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor


REQUIRED_SUBFOLDERS = ("unet", "text_encoder", "tokenizer", "scheduler")


def check_model_dir(path: Union[str, Path], field: str = "pretrained_model_name_or_path") -> Path:
    """Raise a ValueError naming `field` when `path` is not a local diffusers directory."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{field}: {str(path)!r} is not a directory; point it at a local diffusers model "
                         f"directory (with {', '.join(s + '/' for s in REQUIRED_SUBFOLDERS)}); nothing is downloaded")
    missing = [s for s in REQUIRED_SUBFOLDERS if not (path / s).is_dir()]
    if missing:
        raise ValueError(f"{field}: model directory {str(path)!r} has no {', '.join(m + '/' for m in missing)} "
                         f"subfolder; expected a diffusers layout ({', '.join(s + '/' for s in REQUIRED_SUBFOLDERS)}, "
                         f"optional vae/), e.g. one written by pipeline.save_pretrained")
    return path


FINGERPRINT_WHOLE = 2 ** 21  # files up to this size are hashed whole; larger ones by size, first and last MiB


def model_fingerprint(path: Union[str, Path]) -> str:
    """A content fingerprint of a diffusers directory: which weights, tokenizer and scheduler a run was made with.

    Runs record it so that resuming or reusing a run refuses a base model that was replaced in place (same
    path, other weights). Small files are hashed whole, weight files by their size and first and last MiB,
    which any retraining changes, so an SD-sized model takes milliseconds, not a full read.
    """
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(f for sub in REQUIRED_SUBFOLDERS + ("vae",) if (root / sub).is_dir()
                       for f in (root / sub).rglob("*") if f.is_file()):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(root).as_posix()}\0{size}\0".encode())
        with open(file, "rb") as handle:
            if size <= FINGERPRINT_WHOLE:
                digest.update(handle.read())
            else:
                digest.update(handle.read(FINGERPRINT_WHOLE // 2))
                handle.seek(size - FINGERPRINT_WHOLE // 2)
                digest.update(handle.read())
    return "sha256:" + digest.hexdigest()[:32]


SUPPORTED_PREDICTION_TYPES = ("epsilon", "v_prediction")  # = dcfast.scores.PREDICTION_TYPES (no torch import here)


def check_prediction_type(path: Union[str, Path], field: str = "pretrained_model_name_or_path") -> str:
    """The prediction_type in the model's scheduler/scheduler_config.json (read as JSON: no model is loaded).

    epsilon and v_prediction models train and score against their own target; "sample" is refused.
    """
    file = Path(path) / "scheduler" / "scheduler_config.json"
    try:
        kind = json.loads(file.read_text()).get("prediction_type") or "epsilon"
    except (OSError, ValueError, AttributeError) as error:
        raise ValueError(f"{field}: cannot read the scheduler config {str(file)!r} ({error}); the model directory "
                         f"needs scheduler/scheduler_config.json") from None
    if kind not in SUPPORTED_PREDICTION_TYPES:
        raise ValueError(f"{field}: the model's scheduler ({str(file)!r}) has prediction_type {kind!r}; dcfast "
                         f"supports {' and '.join(SUPPORTED_PREDICTION_TYPES)} models only: use an epsilon or "
                         f"v-prediction model")
    return kind


def load_components(path: Union[str, Path], revision: Optional[str] = None, variant: Optional[str] = None) -> Components:
    """Read a local diffusers directory or a Hub id from the local cache (local files only, see dcfast.hub);
    `variant` picks e.g. the fp16 weight files. No vae/ means the model works in pixel space."""
    from dcfast.hub import check_variant, resolve_model

    path = check_model_dir(resolve_model(path, revision))
    check_variant(path, variant)
    kw = dict(local_files_only=True)
    weights = dict(kw, variant=variant) if variant else kw
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **weights).eval() if (path / "vae").is_dir() else None
    return Components(
        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", **weights).eval(),
        text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **weights).eval(),
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw),
        noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw),
        vae=vae,
        fingerprint=model_fingerprint(path),
    )
