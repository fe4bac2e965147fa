"""Pretrain dcfast's tiny base model, shipped at `dcfast/assets/tiny-base/` (run from the repo root):

    OMP_NUM_THREADS=1 python scripts/pretrain_tiny_base.py [--output dcfast/assets/tiny-base] [--quick]

A stand-in for Stable Diffusion 1.x with the same diffusers layout (unet/, vae/, text_encoder/,
tokenizer/, scheduler/, model_index.json; safetensors, about 14 MB), trained from scratch in
minutes on a CPU on captioned images made in code. It draws coloured shapes on plain backgrounds
("a photo of a red circle": 8 colours x 3 shapes) and three grey textures from scikit-image
("a photo of brick" / "grass" / "gravel"). It has never seen a photo of a cat, cup, rocket, horse,
person or motorcycle: those are the demo's personal concepts (dcfast.demo_data).

Choices, for learning fastest on CPU:
- 32x32 RGB images through a tiny trained VAE (32 -> 16x16x4 latents). The run layout needs a vae/
  (`dcfast.runs.load_pipeline` and `StableDiffusionPipeline` decode through one), and a U-Net at 16x16
  costs a quarter of one at 32x32 pixels. The VAE is trained first (reconstruction + a small KL term)
  on the same images plus crops of other scikit-image pictures (never the demo's), so it also
  encodes real photos; its `scaling_factor` is 1 / std of the latents, as Stable Diffusion's.
- U-Net: SD's block types at toy width, (32, 64, 96) channels, except that the full-resolution level
  has no attention: on a CPU, 16x16 self-attention costs more than the rest of the network (DESIGN 4),
  and measured here it makes a training step 2x slower. Cross-attention runs at 8x8 and 4x4.
- Text encoder: the tiny 2-layer CLIP (hidden 32) of `dcfast.models`, trained jointly with the U-Net.
  There is no pretrained one to freeze, and a frozen random encoder would give the colour and shape
  words unstructured embeddings; joint training costs ~1% of a step. Words absent from the captions
  (the demo's class words) keep their random initial embeddings, as rare words do in a real model.
- Captions are dropped (replaced by "") 10% of the time, so classifier-free guidance works.
- Offset noise (Guttenberg 2023: a per-channel constant, std 0.1, added to the training noise). These
  images are large flat colours, whose mean colour stays readable in x_t up to t ~ 999 under SD's
  schedule; with plain noise the model never needs the caption and learns to ignore it (measured:
  after 900 steps, swapping captions changed the denoising loss by < 0.05%, and samples took their
  colour from the initial noise whatever the prompt). With offset noise, telling the image's mean
  colour from the noise's offset needs the caption at every noise level. Sampling and DC scores use
  plain noise, a special case of what the model was trained on.
- SD 1.x's noise schedule (scaled-linear betas, 1000 steps), epsilon prediction, AdamW with cosine
  decay, and an EMA of the U-Net and text encoder (what is saved): EMA gives far better samples after
  a short run.

Recorded run of the committed weights (default settings, OMP_NUM_THREADS=1, one core of a shared
2-core machine): 8.4 minutes (502 s wall, 501 s CPU: VAE 55 s, U-Net 440 s); final VAE reconstruction
MSE 0.0310 (images in [-1, 1]), final U-Net denoising loss 0.0436 (mean of the last 100 steps).
Up to ~2x longer when the cores are busy. Samples follow the colour word well and the shape word
loosely (blobs; circles and squares look alike); textures come out as grey blotches.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTokenizer

from dcfast.models import TINY_WORDS, tiny_text_encoder, write_tiny_tokenizer_files

RESOLUTION = 32
OFFSET_NOISE = 0.1  # per-channel constant added to the training noise (see the module docstring)
COLORS = {"red": (215, 35, 35), "green": (30, 160, 60), "blue": (35, 75, 215), "yellow": (240, 215, 30),
          "white": (250, 250, 250), "black": (15, 15, 15), "purple": (135, 50, 175), "orange": (245, 135, 25)}
SHAPES = ("circle", "square", "triangle")
TEXTURES = ("brick", "grass", "gravel")
# Pictures only the VAE sees (crops): varied natural statistics. None is a demo concept.
VAE_EXTRA = ("camera", "coins", "moon", "page", "text", "hubble_deep_field", "retina", "immunohistochemistry",
             "colorwheel", "cell", "clock", "logo")
# The demo's class words are in the vocabulary (whole tokens) but in no caption.
WORDS = sorted(set(TINY_WORDS) | set(COLORS) | set(SHAPES) | set(TEXTURES) | {"purple", "orange", "motorcycle"})


def write_tokenizer(folder: str) -> CLIPTokenizer:
    """A CLIPTokenizer whose vocabulary holds every word of WORDS whole (checked)."""
    write_tiny_tokenizer_files(folder, WORDS)
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    split = [w for w in WORDS if tokenizer.tokenize(w) != [w + "</w>"]]
    if split:
        raise RuntimeError(f"tokenizer splits {split}")
    return tokenizer


def shape_captions():
    return [f"a photo of a {color} {shape}" for color in COLORS for shape in SHAPES]


def texture_captions():
    return [f"a photo of {texture}" for texture in TEXTURES]


def captions():
    """Every pretraining caption (what the base model can draw)."""
    return shape_captions() + texture_captions()


def draw_shape(color: str, shape: str, rng: np.random.RandomState, size: int = RESOLUTION) -> np.ndarray:
    """One (size, size, 3) uint8 image: a `color` `shape` on a random greyish background, drawn at 4x and
    downsampled (antialiased). Size 40-75% of the side, random position and rotation."""
    big = size * 4
    background = rng.randint(70, 190) + rng.randint(-25, 26, size=3)
    image = Image.new("RGB", (big, big), tuple(int(c) for c in np.clip(background, 0, 255)))
    draw = ImageDraw.Draw(image)
    radius = rng.uniform(0.20, 0.375) * big
    cx, cy = (rng.uniform(radius, big - radius) for _ in range(2))
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    else:
        corners = 4 if shape == "square" else 3
        angle0 = rng.uniform(0, 2 * math.pi)
        reach = radius * (1.25 if shape == "square" else 1.15)
        points = [(cx + reach * math.cos(angle0 + 2 * math.pi * k / corners),
                   cy + reach * math.sin(angle0 + 2 * math.pi * k / corners)) for k in range(corners)]
        draw.polygon(points, fill=fill)
    return np.asarray(image.resize((size, size), Image.LANCZOS))


def _as_rgb(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype != np.uint8:
        array = (255 * (array - array.min()) / max(float(array.max() - array.min()), 1e-8)).astype(np.uint8)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return array[..., :3]


def random_crop(picture: np.ndarray, rng: np.random.RandomState, size: int = RESOLUTION) -> np.ndarray:
    """A random square crop (15-60% of the shorter side), resized to size x size, randomly flipped."""
    h, w = picture.shape[:2]
    side = int(min(h, w) * rng.uniform(0.15, 0.6))
    top, left = rng.randint(0, h - side + 1), rng.randint(0, w - side + 1)
    crop = Image.fromarray(picture[top:top + side, left:left + side]).resize((size, size), Image.LANCZOS)
    crop = np.asarray(crop)
    return crop[:, ::-1] if rng.rand() < 0.5 else crop


def make_dataset(num_shapes: int, num_textures: int, seed: int):
    """(images uint8 (N, 32, 32, 3), caption index per image) for the U-Net; indices into captions()."""
    import skimage.data

    rng = np.random.RandomState(seed)
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    images, labels = [], []
    for n in range(num_shapes):
        k = n % len(pairs)
        images.append(draw_shape(*pairs[k], rng))
        labels.append(k)
    pictures = [_as_rgb(getattr(skimage.data, t)()) for t in TEXTURES]
    for n in range(num_textures):
        k = n % len(TEXTURES)
        images.append(random_crop(pictures[k], rng))
        labels.append(len(pairs) + k)
    return np.stack(images), np.array(labels)


def make_vae_extra(count: int, seed: int) -> np.ndarray:
    import skimage.data

    rng = np.random.RandomState(seed)
    pictures = [_as_rgb(getattr(skimage.data, name)()) for name in VAE_EXTRA]
    return np.stack([random_crop(pictures[n % len(pictures)], rng) for n in range(count)])


def to_model_range(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.copy()).permute(0, 3, 1, 2).float() / 127.5 - 1


def build_vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=16, sample_size=RESOLUTION)


def build_unet(seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=RESOLUTION // 2, in_channels=4, out_channels=4, block_out_channels=(32, 64, 96), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)


def noise_scheduler() -> DDPMScheduler:
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, clip_sample=False)


def cosine_lr(optimizer, steps: int, warmup: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def train_vae(vae: AutoencoderKL, data: torch.Tensor, steps: int, batch: int, seed: int, log_every: int) -> float:
    """Reconstruction MSE + 1e-6 x KL (summed per sample, Stable Diffusion's weighting)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = cosine_lr(optimizer, steps, warmup=20)
    vae.train()
    recent = []
    for step in range(steps):
        x = data[torch.randint(len(data), (batch,), generator=generator)]
        if torch.rand((), generator=generator) < 0.5:
            x = x.flip(-1)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        mse = F.mse_loss(recon, x)
        loss = mse + 1e-6 * posterior.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        recent = (recent + [mse.item()])[-50:]
        if (step + 1) % log_every == 0 or step + 1 == steps:
            print(f"  vae step {step + 1}/{steps}  mse {sum(recent) / len(recent):.4f}", flush=True)
    return sum(recent) / len(recent)


@torch.no_grad()
def encode_all(vae: AutoencoderKL, images: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    vae.eval()
    return torch.cat([vae.encode(x).latent_dist.mode() for x in images.split(chunk)])


def train_unet(unet, text_encoder, tokenizer, latents, labels, texts, steps, batch, seed, log_every):
    """Epsilon-prediction denoising loss on (latent, caption) pairs; returns (EMA models, final loss)."""
    generator = torch.Generator().manual_seed(seed)
    scheduler = noise_scheduler()
    alphas = scheduler.alphas_cumprod
    ids = tokenizer(texts + [""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    empty = len(texts)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    schedule = cosine_lr(optimizer, steps, warmup=100)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    unet.train(), text_encoder.train()
    recent = []
    for step in range(steps):
        pick = torch.randint(len(latents), (batch,), generator=generator)
        x0, caption = latents[pick], labels[pick].clone()
        flip = torch.rand(batch, generator=generator) < 0.5  # mirrored shapes and textures keep their caption
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        caption[torch.rand(batch, generator=generator) < 0.1] = empty
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        noise = noise + OFFSET_NOISE * torch.randn(batch, x0.shape[1], 1, 1, generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        hidden = text_encoder(ids[caption])[0]
        loss = F.mse_loss(unet(xt, t, encoder_hidden_states=hidden).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        decay = min(0.995, (1 + step) / (10 + step))  # EMA warm-up: early averages forget the random init
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        recent = (recent + [loss.item()])[-100:]
        if (step + 1) % log_every == 0 or step + 1 == steps:
            print(f"  unet step {step + 1}/{steps}  loss {sum(recent) / len(recent):.4f}  "
                  f"lr {schedule.get_last_lr()[0]:.2e}", flush=True)
    return ema_unet, ema_text, sum(recent) / len(recent)


def model_card(stats: dict) -> str:
    lines = ["# dcfast tiny base model", "",
             "A tiny Stable-Diffusion-layout text-to-image model (32x32 RGB, VAE latents 16x16x4), pretrained from",
             "scratch by `scripts/pretrain_tiny_base.py` on images made in code. A stand-in for SD 1.x to run",
             "dcfast's demo and tests without downloads; it makes no claim of quality.", "",
             "It can draw these captions (and little else):", ""]
    lines += [f"- {c}" for c in stats["captions"]]
    lines += ["", "Samples follow the colour word well and the shape word loosely (blobs; circles and squares look",
              "alike); textures come out as grey blotches. It has never seen photos of cats, cups, rockets, horses,",
              "people or motorcycles (the demo concepts): it cannot draw them before personalization.",
              "", "Run: " + json.dumps({k: v for k, v in stats.items() if k != "captions"})]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="dcfast/assets/tiny-base", help="diffusers directory to write (replaced)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, weights and training")
    parser.add_argument("--vae_steps", type=int, default=200, help="VAE optimizer steps")
    parser.add_argument("--unet_steps", type=int, default=2500, help="U-Net + text encoder optimizer steps")
    parser.add_argument("--batch", type=int, default=16, help="images per step (both stages)")
    parser.add_argument("--num_shapes", type=int, default=4800, help="shape images (200 per caption)")
    parser.add_argument("--num_textures", type=int, default=600, help="texture crops (200 per texture)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20 VAE and 40 U-Net steps")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.quick:
        args.vae_steps, args.unet_steps, args.num_shapes, args.num_textures = 20, 40, 240, 60
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()

    # 1. Data: captioned shapes and textures (U-Net and VAE), plus other pictures' crops (VAE only).
    images, labels = make_dataset(args.num_shapes, args.num_textures, args.seed)
    extra = make_vae_extra(len(images) // 4, args.seed + 1)
    pixels = to_model_range(images)
    print(f"data: {len(images)} captioned images, {len(extra)} VAE-only crops ({time.time() - started:.0f} s)", flush=True)

    # 2. The VAE, then every image's latent once (the VAE is frozen from here), and its scaling factor.
    vae = build_vae(args.seed)
    vae_mse = train_vae(vae, torch.cat([pixels, to_model_range(extra)]), args.vae_steps, args.batch, args.seed,
                        log_every=25)
    latents = encode_all(vae, pixels)
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    latents = latents * vae.config.scaling_factor
    print(f"vae done: mse {vae_mse:.4f}, scaling_factor {vae.config.scaling_factor:.4f} "
          f"({time.time() - started:.0f} s)", flush=True)

    # 3. The tokenizer (colour, shape and demo class words whole), the text encoder and the U-Net.
    vocabulary = tempfile.TemporaryDirectory()
    tokenizer = write_tokenizer(vocabulary.name)
    text_encoder = tiny_text_encoder(len(tokenizer), tokenizer.eos_token_id, seed=args.seed)
    unet = build_unet(args.seed)
    ema_unet, ema_text, unet_loss = train_unet(unet, text_encoder, tokenizer, latents, torch.from_numpy(labels),
                                               captions(), args.unet_steps, args.batch, args.seed + 2, log_every=100)

    # 4. Save a diffusers directory (DDIM for sampling, as SD's pipelines; training reads it as DDPM).
    pipe = StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=ema_text, tokenizer=tokenizer, unet=ema_unet,
        scheduler=DDIMScheduler.from_config(noise_scheduler().config, steps_offset=1, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    output = Path(args.output)
    if output.exists():
        shutil.rmtree(output)
    pipe.save_pretrained(output, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):  # for slow-tokenizer loaders (transformers 4.x) beside tokenizer.json
        shutil.copy(Path(vocabulary.name) / name, output / "tokenizer" / name)
    vocabulary.cleanup()
    stats = {"seconds": round(time.time() - started), "vae_mse": round(vae_mse, 5), "unet_loss": round(unet_loss, 5),
             "vae_steps": args.vae_steps, "unet_steps": args.unet_steps, "batch": args.batch, "seed": args.seed,
             "threads": args.threads, "captions": captions()}
    (output / "README.md").write_text(model_card(stats))
    size = sum(p.stat().st_size for p in output.rglob("*") if p.is_file())
    print(f"saved {output} ({size / 2**20:.1f} MB) in {stats['seconds']} s: vae mse {vae_mse:.4f}, "
          f"unet loss {unet_loss:.4f}", flush=True)


if __name__ == "__main__":
    main()
