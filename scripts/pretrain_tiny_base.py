"""Pretrain dcfast's tiny base model on the tiny world, shipped at `dcfast/assets/tiny-base/`:

    python scripts/pretrain_tiny_base.py [--output dcfast/assets/tiny-base] [--quick]
    python scripts/pretrain_tiny_base.py --init_from BASE --unet_steps 0 --zero_snr_steps N --output DIR
    python scripts/pretrain_tiny_base.py --vae_from BASE --output DIR [--unet_steps N] [--zero_snr_steps M]

(the second continues a zero-SNR base model's U-Net and text encoder for N more steps on its own VAE and
vocabulary, `--unet_steps N --zero_snr_steps 0` an epsilon one's; the third trains a new U-Net and text
encoder on a base model's VAE)

A stand-in for Stable Diffusion 1.x with the same diffusers layout (unet/, vae/, text_encoder/,
tokenizer/, scheduler/, model_index.json; safetensors), trained from scratch on a CPU on the tiny
world (`dcfast.world.scenes`): 32x32 scenes of 6 shapes x 8 colours x 3 fill patterns (with a second
colour) x 3 backgrounds, with position, scale and rotation jitter. It draws "a photo of a red star"
and "a photo of a teal ring with orange dots on a black background"; "a photo of a star" gives a
star of any look (c_0, the pretrained concept of the world's personal concepts).

Choices, each measured on this 2-core CPU:
- A tiny trained VAE (32x32x3 -> 16x16x4 latents), not pixel space: a U-Net step (batch 32, one
  thread) costs 0.33 s on 16x16x4 latents and 1.32 s on 32x32 pixels, 4x, and every later training
  and evaluation pays the same factor. The VAE is trained first (reconstruction + 1e-6 KL) on world
  renders plus 1/16 as many crops of scikit-image pictures (none a demo concept), so the photo demo
  (`dcfast demo --photos`) still encodes photos roughly; its `scaling_factor` is 1 / std of the
  latents. The oracle's accuracy on VAE reconstructions of fresh renders is recorded in the model
  card: whatever the VAE loses, no sample can show. Measured: a first VAE (600 steps of batch 32,
  posterior samples decoded, MSE only, 1/4 photo crops) lost stripes and dots (oracle on its
  reconstructions: colour 0.81, pattern 0.84); decoding the latent mean, an added L1 term and
  1500 steps of batch 16 with fewer photo crops is this script's answer.
- U-Net: SD's block types at toy width, (32, 64, 96) channels, no attention at the full-resolution
  level (16x16 self-attention costs more than the rest of the network on a CPU, docs/design.md); (48, 96,
  128) was 1.7x slower per step, too slow for the time budget.
- Text encoder: the tiny 2-layer CLIP (hidden 32) of `dcfast.models.tiny`, trained jointly with the U-Net
  (there is no pretrained one to freeze). Its vocabulary holds the world's words and the photo
  demo's class words whole.
- Captions name a random subset of a scene's attributes: the shape always, the colour, the pattern
  (with or without its second colour) and the background each with probability 0.7, so partial
  prompts ("a photo of a star", "a photo of a red star") mean "any value" of what they leave out;
  10% of captions are empty, for classifier-free guidance.
- Two phases in one run: epsilon prediction on SD 1.x's schedule with offset noise (`--unet_steps`;
  it learns shapes), then v-prediction at zero terminal SNR from that phase's EMA weights
  (`--zero_snr_steps`; it makes the caption, not the start noise, set colour and background). Why, from
  the levers below: an epsilon base alone missed colour (0.82-0.88) and zero SNR alone, from scratch,
  missed shape (0.54). Offset noise (a per-channel constant, std 0.1, added to the training noise) is what
  the first phase uses against the same leak; the second phase drops it (zero terminal SNR is what offset
  noise approximates). The saved scheduler is the zero-SNR one: SD's scaled-linear betas rescaled so
  that alpha_bar(999) = 0, v-prediction, trailing DDIM steps (Lin et al. 2024). AdamW with warm-up and
  cosine decay in each phase, and an EMA of the U-Net and text encoder (what the next phase starts from,
  and what is saved).
- Sampling guidance 5, not SD's 7.5: chosen on the world's attribute prompts of the previous zero-SNR
  candidate (the shipped epsilon base fine-tuned 3000 steps at zero SNR; 8 samples per colour x shape,
  the script's sampling seeds): guidance 7.5 gave shape 0.812, colour 0.878; 5 gave 0.870 / 0.935; 7.5
  with guidance rescale 0.7 gave 0.841 / 0.898, and 5 with it 0.901 / 0.930 (not taken: one
  setting fewer, and diffusers' samplers and dcfast's evaluation need no new field). At 7.5 the samples
  overshoot colour and lose edges (yellow circles and squares read as other shapes). `dcfast.experiments.runner`'s world
  regime samples at 5 (`validation_guidance_scale`, which `dcfast eval` follows).

At the end the script samples every "a photo of a {colour} {shape}" prompt with DDIM (20 steps, CFG
`--eval_guidance`) and reports the oracle's shape and colour accuracy on the samples (the issue's bar:
shape >= 85%, colour >= 90%), plus the same for patterns and backgrounds on full-caption prompts.

Recorded run of the committed weights (2026-12-05; `--unet_steps 7000 --zero_snr_steps 3000 --zero_snr_lr
3e-4 --eval_guidance 5`, the defaults; seed 0, 2 threads on the otherwise idle 2-core machine; the model
card `dcfast/assets/tiny-base/README.md` holds the same record):
- 3005 s wall in all (50 min): data 32 s, VAE 1500 steps ~300 s (the same VAE, bit for bit, as the
  previous base's), epsilon phase 7000 steps 1697 s (loss 0.0570, mean of the last 200 steps), zero-SNR
  phase 3000 steps ~855 s (v-loss 0.2289), oracle scoring ~110 s. The oracle on VAE reconstructions of
  2,000 fresh renders: shape 0.999, colour 0.961, pattern 0.979, background 1.0.
- Oracle on CFG samples (guidance 5), short prompts (every colour x shape, 8 samples each): **shape 0.880,
  colour 0.940** (the bar: 0.85 and 0.90; both met). By colour: red 0.92, orange 0.79, yellow 0.94, green
  0.98, teal 0.98, blue 0.96, purple 1.0, pink 0.96. Full captions (shape x pattern x background, random
  colours): shape 0.935, colour 0.75, pattern 0.66, background **1.0** (0.46 on the epsilon base).
  Checked with other sampling seeds (100 + k instead of 4 + k): shape 0.880, colour 0.938; by shape circle
  0.78, square 0.86, triangle 0.92, star 0.84 (0.53 on the epsilon base), ring 1.0, cross 0.88.
  At guidance 7.5 (the same seeds) it misses both bars, shape 0.826, colour 0.862 (red 0.60, orange 0.71):
  the guidance, chosen on the previous candidate, matters as much here.
- Sequential LoRA on it (`dcfast bench world --seeds 3`: known-same-class-test, the world regime, now without
  offset noise and at guidance 5): F[1, 1] = 0.969 / 0.969 / 0.906 (mean 0.948), F[1, 4] = 0 in every
  seed; the yardstick's bars (F[1, 1] >= 0.7, a drop >= 0.3) hold. On the epsilon base: 0.656.

The previous base (the epsilon phase alone: `--unet_steps 6000 --zero_snr_steps 0 --eval_guidance 7.5`,
3315 s while other jobs shared the machine; U-Net loss 0.0604) scored shape 0.891, colour 0.820 on short
prompts and shape 0.826, colour 0.530, pattern 0.565, background 0.458 on full captions: it followed one or
two attribute words, not four, and sequential LoRA's F[1, 1] on `known-same-class-test` was 0.656 over 3 seeds.
The levers measured on it follow; "the shipped base" in them means that epsilon base (commit c6747a0's
`dcfast/assets/tiny-base`), scored at guidance 7.5, and their commands continue it with `--zero_snr_steps 0
--eval_guidance 7.5` unless they say otherwise.

Measured lever, not shipped (2026-12-05): `--init_from <the epsilon base> --unet_steps 7000 --lr 3e-4`
(13000 U-Net steps in all; 1830 s wall, 0.23 s/step on the otherwise idle 2-core machine): U-Net loss 0.0604
-> 0.0534, oracle on short prompts **shape 0.938, colour 0.878** (from 0.891 / 0.820); full captions shape
0.845, colour 0.549, pattern 0.579, background 0.482. Colour is still short of 0.90. Swapping it in would
change every world result (the 3-seed methods tables must be rerun, ~200 min on 2 cores), so it was not
swapped in.

Where the missing colour points are (2026-12-05; 8 samples per colour x shape prompt, another seed than the
script's, so about +-0.02 from its figures). The colour confusions are two pairs, each a shift toward
green: on the shipped base blue is read as teal (35 of 48 samples; blue 0.27 right) and orange as yellow (20
of 48; orange 0.58); every other colour is >= 0.81. On the 13000-step base: blue 0.69, orange 0.44, the rest
>= 0.90. Not the VAE (it reconstructs every palette colour within 4 of 255 per channel, median over the
shape's pixels) nor the oracle (the foreground colours of misread samples lie nearer the colour it reads):
- orange is a guidance overshoot: the median foreground colour of "a photo of an orange circle" moves with
  the guidance scale from (238, 148, 34) at 4, near the palette's (245, 140, 20), to (246, 175, 35) at 7.5
  and (254, 181, 38) at 12, toward yellow (240, 220, 40); yellow itself overshoots to (251, 255, 94).
- blue is under-learned: its conditional colour is a blue-teal mix at every guidance scale ((62, 135,
  104) at 1, (28, 128, 182) at 7.5; palette (40, 80, 220)). Without guidance only 0.42 of colours are
  right: the caption's hold on colour is weak and guidance carries it.
Sampler changes did not help the 13000-step base (colour over all prompts): guidance 3 / 5 / 7.5 / 10 / 14
gave 0.82 / 0.84 / 0.86 / 0.88 / 0.89 (shape falls to 0.87 at 14); 50 DDIM steps 0.86 (20: 0.86);
guidance rescale (Lin et al. 2024) 0.5 / 0.7 gave 0.86 / 0.85. Min-SNR loss weighting (`--snr_gamma 5`)
did not either: continuing the shipped base 1500 steps at lr 3e-4 gave colour 0.841 with it and 0.841
without (shape 0.922 / 0.912). The 13000-step base draws stars better (0.81 of samples against 0.53) but
does not lift sequential LoRA's F[1, 1] on known-same-class-test: `dcfast bench world --seeds 3` with it gave
0.562 / 0.688 / 0.750 (mean 0.667, against 0.656 on the shipped base); concept 1's shape read right in
0.62-0.81 of its samples and its colour in 0.84-0.91. The green star's fidelity after its task is set by
what the LoRA and token learn in 200 steps, not by the base's stars.

Levers measured on 2026-12-05 (session 5), none shipped:
- The text encoder is not what lags. Its outputs for "a photo of a {colour} star" are laid out like the
  colours themselves: teal-blue is its closest pair (distance 0.46 of the mean pairwise distance; 0.64 on the
  13000-step base, where blue reads better). Training it 10x faster (`--text_lr_scale 10`, 1500 continued
  steps at lr 3e-4) left that distance at 0.52 and gave colour 0.792, blue 0.23, against 0.841 at 1x.
- U-Net step speed (batch 32, 2 threads, 0.21 s): channels_last 0.21 s, torch.compile 0.21 s (84 s to
  compile), bf16 autocast 0.34 s. No more steps fit the 60-minute budget (~10000 at most).
- The confused pairs are the VAE's closest: the latent distance (centre of a solid shape, over the three
  backgrounds) is 0.93 orange-yellow, 1.07 red-orange, 1.42 teal-blue; every other pair >= 1.6. A second
  palette (teal replaced by brown, every colour moved within its name's hue/saturation/value range to
  maximise the smallest latent distance, 1.36; a new oracle, 0.9998 colour on fresh renders) and a full
  run (VAE 1500, U-Net 9000 steps, 3011 s) fixed blue (0.98) and orange (0.98) but broke others: red 0.33,
  brown 0.13, purple 0.46, pink 0.27; colour 0.643, shape 0.776 (the VAE's reconstructions kept colour
  0.924, against 0.961). Not kept: the darker colours it needs are the hard ones.
- Zero terminal SNR (`--zero_snr_steps`: SD's betas rescaled so that alpha_bar(999) = 0, v-prediction, trailing
  DDIM steps, no offset noise; Lin et al. 2024). Why: on SD's schedule alpha_bar(999) = 0.0047, so the
  per-channel mean of a 16x16 latent (std 0.66 over world images, scaled) enters x_999 at 0.068 x 0.66 = 0.045,
  against 1/16 = 0.0625 for the mean of the noise: the start noise's mean, not the caption, sets much of a
  sample's mean colour, and the caption's hold on colour and background is weak (full prompts' background
  0.46). `--vae_from` the shipped base `--unet_steps 0 --zero_snr_steps 6000 --zero_snr_lr 1e-3` (6000 steps
  from scratch; 1300 s, 1575 s with scoring; guidance 7.5 here and below): colour
  **0.922** (blue 0.85, orange 0.65, the rest >= 0.94), full prompts' background **1.0** and colour 0.70,
  but shape **0.539** (stars 0.13, guidance 3: shape 0.57, colour 0.94). A likely reason, not tested: the
  v-loss weighs an x0 error by SNR + 1 where epsilon weighs it by SNR, so the noisiest steps (global colour)
  gain weight and the mid-noise steps that draw shape do not; in the same steps it learned colour, not shape. It meets the colour bar and misses the shape bar, so it is not shipped.
- Zero terminal SNR as a fine-tune of the shipped base (`--init_from` it `--unet_steps 0
  --zero_snr_steps 3000 --zero_snr_lr 3e-4`, 690 s of U-Net steps, 875 s with scoring; the epsilon model converts to v
  within ~1000 steps): shape **0.813**, colour **0.878** (blue 1.0, teal 1.0, red 0.58, orange 0.73), full
  prompts shape 0.90, colour 0.69, background **1.0**. With another sampling seed: stars 0.81 (the shipped
  base: 0.64), yellow circles and squares read as other shapes (0.0 and 0.25). Both bars still missed, by
  0.04 and 0.02, and the two stages (3315 + 875 s) exceed the 60-minute budget. Yet on it sequential LoRA
  learns and loses the green star (known-same-class-test, world regime with noise_offset 0, 32 samples, seeds 0/1/2):
  F[1, 1] = 0.906 / 0.875 / 0.938 (mean 0.906, against 0.656 on the shipped base; colour 1.0 at state 1) and
  F[1, 4] = 0 in every seed; F[i, i] 0.88-0.94, 0.56-0.84, 0.28-0.47, 0.50-0.72. The lever left: one run that
  pretrains with epsilon (its shapes) and ends at zero SNR (its colours and backgrounds) inside 60 minutes:
  the committed weights (top). (These runs used a `--zero_snr` flag, since replaced by `--zero_snr_steps`; the
  forms above are the same computations.)
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
from PIL import Image

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTokenizer

from dcfast.world import scenes as world
from dcfast.experiments.photos import DEMO_CONCEPTS
from dcfast.models.tiny import TINY_WORDS, tiny_text_encoder, write_tiny_tokenizer_files

RESOLUTION = world.RESOLUTION
OFFSET_NOISE = 0.1  # per-channel constant added to the training noise (see the module docstring)
KEEP_ATTRIBUTE = 0.7  # probability that a caption names each of colour, pattern, background
EMPTY_CAPTION = 0.1  # classifier-free guidance dropout
# Pictures only the VAE sees (crops): varied natural statistics for the photo demo. None is a demo concept.
VAE_EXTRA = ("camera", "coins", "moon", "page", "text", "hubble_deep_field", "retina", "immunohistochemistry",
             "colorwheel", "cell", "clock", "logo", "brick", "grass", "gravel")
# The world's words and the photo demo's class words are whole tokens.
WORDS = sorted(set(TINY_WORDS) | set(world.caption_words()) | {c.class_word for c in DEMO_CONCEPTS})


def write_tokenizer(folder: str) -> CLIPTokenizer:
    """A CLIPTokenizer whose vocabulary holds every word of WORDS whole (checked)."""
    write_tiny_tokenizer_files(folder, WORDS)
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    split = [w for w in WORDS if tokenizer.tokenize(w) != [w + "</w>"]]
    if split:
        raise RuntimeError(f"tokenizer splits {split}")
    return tokenizer


def sample_caption(scenes: world.Scene, i: int, rng: np.random.Generator) -> str:
    """A caption of scene i naming a random subset of its attributes (module docstring), or ""."""
    if rng.random() < EMPTY_CAPTION:
        return ""
    keep = rng.random(4) < KEEP_ATTRIBUTE
    pattern = int(scenes.pattern[i]) if keep[1] else None
    return world.caption(int(scenes.shape[i]), int(scenes.colour[i]) if keep[0] else None, pattern,
                         int(scenes.accent[i]) if keep[1] and keep[3] else None,
                         int(scenes.background[i]) if keep[2] else None)


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


def noise_scheduler(zero_snr: bool = False) -> DDPMScheduler:
    """SD 1.x's schedule; with `zero_snr`, rescaled to zero terminal SNR with v-prediction and trailing
    sampling timesteps (Lin et al. 2024), so that the last step is pure noise (module docstring)."""
    extra = dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing") \
        if zero_snr else {}
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, clip_sample=False, **extra)


def noise_scheduler_of(base: Path) -> DDPMScheduler:
    """The training schedule of a saved base model (its sampling scheduler's betas and prediction type)."""
    return DDPMScheduler.from_config(DDIMScheduler.load_config(base / "scheduler"))


def cosine_lr(optimizer, steps: int, warmup: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def train_vae(vae: AutoencoderKL, data: torch.Tensor, steps: int, batch: int, seed: int, log_every: int) -> float:
    """Reconstruction of the latent mean (MSE + 0.5 L1, for sharp stripes and dots) + 1e-6 x KL.

    Decoding the mean rather than a posterior sample: nothing downstream samples the posterior
    (dcfast encodes with the mean), and the sampling noise cost detail in a short run."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = cosine_lr(optimizer, steps, warmup=50)
    vae.train()
    recent = []
    for step in range(steps):
        x = data[torch.randint(len(data), (batch,), generator=generator)]
        if torch.rand((), generator=generator) < 0.5:
            x = x.flip(-1)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.mean).sample
        mse = F.mse_loss(recon, x)
        loss = mse + 0.5 * F.l1_loss(recon, x) + 1e-6 * posterior.kl().mean()
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


def train_unet(unet, text_encoder, tokenizer, latents, scenes, steps, batch, seed, log_every, lr=1e-3,
               snr_gamma=None, text_lr_scale=1.0, zero_snr=False):
    """Denoising loss on (latent, sampled caption) pairs, epsilon-prediction on SD's schedule or v-prediction at
    zero terminal SNR (`zero_snr`); returns (EMA U-Net, EMA text encoder, final loss).

    With `snr_gamma`, each sample's loss is weighted by min(SNR(t), gamma) / SNR(t) (Min-SNR weighting,
    Hang et al. 2023): low-noise steps, where the caption hardly matters, weigh less."""
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    scheduler = noise_scheduler(zero_snr)
    alphas = scheduler.alphas_cumprod
    offset = 0.0 if zero_snr else OFFSET_NOISE  # zero terminal SNR is what offset noise approximates
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW([{"params": list(unet.parameters()), "lr": lr},
                                   {"params": list(text_encoder.parameters()), "lr": lr * text_lr_scale}],
                                  weight_decay=1e-2)
    schedule = cosine_lr(optimizer, steps, warmup=200)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    unet.train(), text_encoder.train()
    recent, started = [], time.time()
    for step in range(steps):
        pick = torch.randint(len(latents), (batch,), generator=generator)
        texts = [sample_caption(scenes, int(i), rng) for i in pick]
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        x0 = latents[pick]
        flip = torch.rand(batch, generator=generator) < 0.5  # mirrored scenes keep their caption
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        noise = noise + offset * torch.randn(batch, x0.shape[1], 1, 1, generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        hidden = text_encoder(ids)[0]
        target = scheduler.get_velocity(x0, noise, t) if zero_snr else noise
        loss = F.mse_loss(unet(xt, t, encoder_hidden_states=hidden).sample, target, reduction="none").mean((1, 2, 3))
        if snr_gamma is not None:
            snr = alphas[t] / (1 - alphas[t])
            loss = loss * snr.clamp(max=snr_gamma) / snr
        loss = loss.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        decay = min(0.999, (1 + step) / (10 + step))  # EMA warm-up: early averages forget the random init
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        recent = (recent + [loss.item()])[-200:]
        if (step + 1) % log_every == 0 or step + 1 == steps:
            print(f"  unet step {step + 1}/{steps}  loss {sum(recent) / len(recent):.4f}  "
                  f"lr {schedule.get_last_lr()[0]:.2e}  ({time.time() - started:.0f} s)", flush=True)
    return ema_unet, ema_text, sum(recent) / len(recent)


def oracle_scores(pipe, samples_per_prompt: int, seed: int, guidance_scale: float) -> dict:
    """The oracle's accuracy on CFG samples: shape and colour on every "a photo of a {colour} {shape}",
    pattern and background on full captions (one per shape x pattern x background, random colours)."""
    from dcfast.world.oracle import load_oracle, read_attributes
    from dcfast.eval.sampling import generate

    oracle = load_oracle()
    rng = np.random.default_rng(seed)
    short = [(s, c) for s in range(len(world.BASE_SHAPES)) for c in range(len(world.COLOURS))]
    full = [(s, int(rng.integers(8)), p, int(rng.integers(8)), b) for s in range(len(world.BASE_SHAPES))
            for p in range(len(world.PATTERNS)) for b in range(len(world.BACKGROUNDS))]
    full = [(s, c, p, (c + 1 + a % 7) % 8, b) for s, c, p, a, b in full]  # accent != colour

    def judge(prompts, truths):
        """Per attribute, each prompt's fraction of samples the oracle reads with the prompt's value."""
        hits = {}
        for k, (prompt, truth) in enumerate(zip(prompts, truths)):
            images = generate(pipe, prompt, samples_per_prompt, num_inference_steps=20, guidance_scale=guidance_scale,
                              generator=torch.Generator().manual_seed(seed + k))
            reading = read_attributes(oracle, images)
            for name, value in truth.items():
                hits.setdefault(name, []).append(float((reading[name] == value).double().mean()))
        return hits

    def mean(values) -> float:
        return round(float(np.mean(values)), 4)

    short_hits = judge([world.caption(s, c) for s, c in short], [{"shape": s, "colour": c} for s, c in short])
    scores = {name: mean(v) for name, v in short_hits.items()}
    per_colour = {name: mean([h for (s, c), h in zip(short, short_hits["colour"]) if c == colour])
                  for colour, name in enumerate(world.COLOUR_NAMES)}
    detail = {name: mean(v) for name, v in judge(
        [world.caption(*f) for f in full],
        [{"shape": s, "colour": c, "pattern": p, "background": b} for s, c, p, a, b in full]).items()}
    return {"short_prompts": scores, "short_prompts_colour_by_colour": per_colour, "full_prompts": detail,
            "samples_per_prompt": samples_per_prompt, "guidance_scale": guidance_scale}


@torch.no_grad()
def vae_oracle_accuracy(vae: AutoencoderKL, count: int, seed: int) -> dict:
    """The oracle's accuracy per attribute on VAE reconstructions of fresh renders (what the VAE keeps)."""
    from dcfast.world.oracle import load_oracle, read_attributes

    scenes = world.random_scenes(count, seed, world.BASE_SHAPES)
    pixels = to_model_range(world.render(scenes))
    recon = torch.cat([vae.decode(vae.encode(x).latent_dist.mode()).sample for x in pixels.split(256)])
    reading = read_attributes(load_oracle(), ((recon + 1) / 2).clamp(0, 1))
    return {name: round(float((reading[name] == torch.from_numpy(getattr(scenes, name))).double().mean()), 4)
            for name in world.ATTRIBUTES}


def schedule_line(stats: dict) -> str:
    """How the model was trained and should be sampled, from the run's stats."""
    if not stats.get("zero_snr_steps"):
        return ("Training: epsilon prediction on SD 1.x's noise schedule with offset noise 0.1; sample it with DDIM "
                "(its saved scheduler).")
    return (f"Training: {stats['unet_steps']} epsilon-prediction steps, then {stats['zero_snr_steps']} v-prediction "
            "steps at zero terminal SNR (Lin et al. 2024); its saved scheduler is the zero-SNR one (rescaled betas, "
            "v_prediction, trailing DDIM steps). Sample it with DDIM at the guidance its scores below used.")


def model_card(stats: dict) -> str:
    lines = ["# dcfast tiny base model", "",
             "A tiny Stable-Diffusion-layout text-to-image model (32x32 RGB, VAE latents 16x16x4), pretrained from",
             "scratch by `scripts/pretrain_tiny_base.py` on the tiny world (`dcfast.world.scenes`): one shape (circle,",
             "square, triangle, star, ring, cross) in one of 8 colours, solid, striped or dotted in a second colour,",
             "on a white, grey or black background. It follows short captions such as \"a photo of a red star\"",
             "(shape and colour, scores below) and full captions (\"a photo of a teal ring with orange dots on a black",
             "background\") only partly; attributes a prompt leaves out are drawn at random. It has never seen the",
             "world's personal concepts with a modifier token, nor any photo (the photo demo's concepts), nor any of",
             "the world's novel shapes (`dcfast.world.scenes.NOVEL_SHAPES`): `world_factors.json` records the factors",
             "it was trained on, and `dcfast bench world` refuses a base whose record holds a concept's novel shape.", "",
             schedule_line(stats), "",
             "Oracle scores of CFG samples (fraction of samples with the prompt's attribute):", "",
             "```", json.dumps(stats.get("oracle"), indent=1), "```", "",
             "Run: " + json.dumps({k: v for k, v in stats.items() if k != "oracle"})]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="dcfast/assets/tiny-base", help="diffusers directory to write (replaced)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, weights and training")
    parser.add_argument("--vae_steps", type=int, default=1500, help="VAE optimizer steps")
    parser.add_argument("--unet_steps", type=int, default=7000, help="epsilon-prediction U-Net + text encoder optimizer steps")
    parser.add_argument("--batch", type=int, default=32, help="images per U-Net step")
    parser.add_argument("--vae_batch", type=int, default=16, help="images per VAE step")
    parser.add_argument("--num_scenes", type=int, default=48000, help="world renders (pose jitter makes each unique)")
    parser.add_argument("--eval_samples", type=int, default=8,
                        help="CFG samples per prompt for the oracle scores (0: no scoring)")
    parser.add_argument("--eval_guidance", type=float, default=5.0, help="CFG scale of the oracle-scored samples")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 512 scenes, 20 VAE steps, at most 40 epsilon and 20 zero-SNR "
                                                         "U-Net steps, at most 2 samples per scored prompt")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--init_from", default=None,
                        help="continue from this base model: its VAE (not retrained), tokenizer, text encoder and "
                             "U-Net, for --unet_steps and --zero_snr_steps more steps (a zero-SNR model: --unet_steps 0)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the epsilon steps")
    parser.add_argument("--text_lr_scale", type=float, default=1.0,
                        help="the text encoder's learning rate is --lr times this")
    parser.add_argument("--zero_snr_steps", type=int, default=3000,
                        help="after the --unet_steps epsilon steps, this many more from their EMA weights at zero "
                             "terminal SNR (v-prediction, trailing sampling steps, no offset noise); the saved model is "
                             "then a zero-SNR model")
    parser.add_argument("--zero_snr_lr", type=float, default=3e-4, help="peak learning rate of the zero-SNR steps")
    parser.add_argument("--vae_from", default=None,
                        help="reuse this base model's VAE (not retrained) and train a new U-Net and text encoder")
    parser.add_argument("--snr_gamma", type=float, default=None, help="Min-SNR loss weighting with this gamma")
    args = parser.parse_args(argv)
    if args.zero_snr_steps and args.snr_gamma is not None:
        parser.error("--snr_gamma weights an epsilon loss; it is undefined at zero SNR (drop --zero_snr_steps or "
                     "--snr_gamma)")
    if min(args.unet_steps, args.zero_snr_steps) < 0 or args.unet_steps + args.zero_snr_steps == 0:
        parser.error("--unet_steps and --zero_snr_steps must be >= 0 and not both 0")
    if args.init_from and args.unet_steps and noise_scheduler_of(Path(args.init_from)).config.rescale_betas_zero_snr:
        parser.error(f"--init_from {args.init_from} is a zero-terminal-SNR model (v-prediction): continue it with "
                     f"--unet_steps 0 --zero_snr_steps N")
    if args.quick:
        args.vae_steps, args.num_scenes, args.eval_samples = 20, 512, min(args.eval_samples, 2)
        args.unet_steps, args.zero_snr_steps = min(args.unet_steps, 40), min(args.zero_snr_steps, 20)
    zero_snr = args.zero_snr_steps > 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()

    # 1. Data: world renders (U-Net and VAE), plus other pictures' crops (VAE only).
    scenes = world.random_scenes(args.num_scenes, args.seed, world.BASE_SHAPES)  # the novel shapes held out
    pixels = to_model_range(world.render(scenes))
    extra = to_model_range(make_vae_extra(len(pixels) // 16, args.seed + 1))
    print(f"data: {len(pixels)} world renders, {len(extra)} VAE-only crops ({time.time() - started:.0f} s)", flush=True)

    # 2. The VAE, then every image's latent once (the VAE is frozen from here), and its scaling factor.
    if args.init_from or args.vae_from:
        base = Path(args.init_from or args.vae_from)
        vae = AutoencoderKL.from_pretrained(base / "vae").eval()
        vae_mse, args.vae_steps = float("nan"), 0
        latents = encode_all(vae, pixels) * vae.config.scaling_factor
    else:
        vae = build_vae(args.seed)
        vae_mse = train_vae(vae, torch.cat([pixels, extra]), args.vae_steps, args.vae_batch, args.seed, log_every=100)
        vae.eval()
        latents = encode_all(vae, pixels)
        vae.register_to_config(scaling_factor=float(1 / latents.std()))
        latents = latents * vae.config.scaling_factor
    vae_oracle = vae_oracle_accuracy(vae, 200 if args.quick else 2000, args.seed + 3)
    print(f"vae done: mse {vae_mse:.4f}, scaling_factor {vae.config.scaling_factor:.4f}, oracle on "
          f"reconstructions {vae_oracle} ({time.time() - started:.0f} s)", flush=True)

    # 3. The tokenizer, the text encoder and the U-Net, trained jointly on sampled captions.
    vocabulary = tempfile.TemporaryDirectory()
    tokenizer = write_tokenizer(vocabulary.name)
    if args.init_from:
        from transformers import CLIPTextModel

        if CLIPTokenizer.from_pretrained(base / "tokenizer").get_vocab() != tokenizer.get_vocab():
            raise SystemExit(f"--init_from {base}: its tokenizer differs from this script's vocabulary")
        text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder")
        unet = UNet2DConditionModel.from_pretrained(base / "unet")
    else:
        text_encoder = tiny_text_encoder(len(tokenizer), tokenizer.eos_token_id, seed=args.seed)
        unet = build_unet(args.seed)
    # Epsilon steps (shapes), then zero-SNR steps from their EMA weights (colours and backgrounds), each phase
    # with its own warm-up, cosine decay and EMA.
    phases = [(args.unet_steps, args.lr, False), (args.zero_snr_steps, args.zero_snr_lr, True)]
    unet_started, unet_loss = time.time(), float("nan")
    for steps, lr, phase_zero_snr in phases:
        if steps:
            print(f"{'zero-SNR v-prediction' if phase_zero_snr else 'epsilon'} phase: {steps} steps at lr {lr}",
                  flush=True)
            unet, text_encoder, unet_loss = train_unet(
                unet, text_encoder, tokenizer, latents, scenes, steps, args.batch, args.seed + 2, log_every=100,
                lr=lr, snr_gamma=args.snr_gamma, text_lr_scale=args.text_lr_scale, zero_snr=phase_zero_snr)
    ema_unet, ema_text = unet.eval(), text_encoder.eval()
    unet_seconds = time.time() - unet_started

    # 4. Save a diffusers directory (DDIM for sampling, as SD's pipelines; training reads it as DDPM).
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=ema_text, tokenizer=tokenizer, unet=ema_unet,
        scheduler=DDIMScheduler.from_config(noise_scheduler(zero_snr).config, steps_offset=1,
                                            set_alpha_to_one=zero_snr),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    output = Path(args.output)
    staging = output.with_name(output.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    pipe.save_pretrained(staging, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):  # for slow-tokenizer loaders (transformers 4.x) beside tokenizer.json
        shutil.copy(Path(vocabulary.name) / name, staging / "tokenizer" / name)
    vocabulary.cleanup()

    # 5. Judge CFG samples with the oracle, write the model card, then swap the directory in.
    oracle = oracle_scores(pipe, args.eval_samples, args.seed + 4, args.eval_guidance) if args.eval_samples else None
    stats = {"seconds": round(time.time() - started), "unet_seconds": round(unet_seconds), "vae_mse": round(vae_mse, 5),
             "unet_loss": round(unet_loss, 5), "vae_steps": args.vae_steps, "unet_steps": args.unet_steps,
             "batch": args.batch, "num_scenes": args.num_scenes, "seed": args.seed, "threads": args.threads,
             "init_from": args.init_from, "lr": args.lr, "text_lr_scale": args.text_lr_scale,
             "zero_snr_steps": args.zero_snr_steps, "zero_snr_lr": args.zero_snr_lr, "vae_from": args.vae_from,
             "snr_gamma": args.snr_gamma,
             "vae_reconstruction_oracle_accuracy": vae_oracle, "oracle": oracle}
    (staging / "README.md").write_text(model_card(stats))
    world.write_training_factors(staging)
    if output.exists():
        shutil.rmtree(output)
    staging.rename(output)
    size = sum(p.stat().st_size for p in output.rglob("*") if p.is_file())
    print(f"saved {output} ({size / 2**20:.1f} MB) in {stats['seconds']} s: vae mse {vae_mse:.4f}, "
          f"unet loss {unet_loss:.4f}, oracle {json.dumps(oracle)}", flush=True)


if __name__ == "__main__":
    main()
