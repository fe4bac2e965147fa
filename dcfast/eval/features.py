"""Image feature extractors for MMD and I2I similarity: local CLIP, or a deterministic default.

Every extractor maps images (B, 3, H, W), float in [0, 1], to features (B, D) and has a `name` that
every report prints, since MMD values are only comparable between runs with the same extractor.

- `ClipFeatures(path)`: CLIP image embeddings from a local directory, local files only. `path` may be
  a `CLIPVisionModel` / `CLIPVisionModelWithProjection` / `CLIPModel` directory, an SD 1.x
  `safety_checker/` folder (its vision tower and projection are CLIP ViT-L/14's), or an SD 1.x
  model root (its `safety_checker/` is used).
- `RandomConvFeatures()`: the default when no CLIP model is given. A 3-layer conv net with fixed-seed
  He-normal weights over images resized to 64x64; features are the per-channel mean and std of
  every layer's ReLU maps plus the RGB mean and std (454 dims). Random conv features are a known
  stand-in for learned ones in two-sample tests: they respond to colour, edges and texture at three
  scales. They are not CLIP: numbers are not comparable with published KID/CLIP scores.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
import torch.nn.functional as F

# CLIP's published pixel normalisation (OpenAI ViT-B/L): images in [0, 1] -> (x - mean) / std.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a (B, 3, H, W) tensor in [0, 1], got {tuple(getattr(images, 'shape', ()))}")
    return images.float()


def _resize_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to `size` (bicubic, antialiased), then center-crop to size x size."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) != (h, w):
        images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return images[..., top:top + size, left:left + size].clamp(0, 1)


class RandomConvFeatures:
    """Deterministic default features: fixed-seed random conv net statistics (see module docstring)."""

    clip = False
    name = "dcfast-randconv-v1 (deterministic random conv features, seed 0, 64x64; not CLIP)"
    size = 64
    channels = (32, 64, 128)

    def __init__(self, device: str | torch.device = "cpu"):
        generator = torch.Generator().manual_seed(0)
        self.weights = []
        c_in = 3
        for c_out, k in zip(self.channels, (5, 3, 3)):
            std = (2.0 / (c_in * k * k)) ** 0.5
            self.weights.append((torch.randn(c_out, c_in, k, k, generator=generator) * std).to(device))
            c_in = c_out

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = _resize_center_crop(_check_images(images).to(self.weights[0].device), self.size)
        feats = [x.mean((2, 3)), x.std((2, 3))]
        x = x * 2 - 1
        for weight in self.weights:
            x = F.relu(F.conv2d(x, weight, stride=2, padding=weight.shape[-1] // 2))
            feats += [x.mean((2, 3)), x.std((2, 3))]
        return torch.cat(feats, dim=1)


class ClipFeatures:
    """CLIP image embeddings (projected when the checkpoint has a projection) from a local directory."""

    clip = True

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu", batch_size: int = 32):
        path = _resolve_clip_dir(os.fspath(path))
        self.vision, self.projection = _load_clip(path)
        self.vision.to(device).eval()
        if self.projection is not None:
            self.projection.to(device).eval()
        self.device, self.batch_size = torch.device(device), batch_size
        self.size = self.vision.config.image_size
        self.name = f"CLIP image embeddings ({path})"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = _check_images(images)
        mean = torch.tensor(CLIP_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=self.device).view(1, 3, 1, 1)
        out = []
        for chunk in images.split(self.batch_size):
            pixels = (_resize_center_crop(chunk.to(self.device), self.size) - mean) / std
            pooled = self.vision(pixel_values=pixels).pooler_output
            out.append(self.projection(pooled) if self.projection is not None else pooled)
        return torch.cat(out).float().cpu()


def _resolve_clip_dir(path: str) -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--features: {path} is not a directory (expected a local CLIP vision model "
                                f"or an SD 1.x safety_checker/ folder)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        nested = os.path.join(path, "safety_checker")
        if os.path.isfile(os.path.join(nested, "config.json")):
            return nested
        raise FileNotFoundError(f"--features: {os.path.join(path, 'config.json')} not found (expected a CLIP "
                                f"vision model directory, a safety_checker/ folder or an SD 1.x model root)")
    return path


def _load_clip(path: str):
    """(vision tower, projection or None), refusing checkpoints whose vision weights are missing."""
    from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

    config_file = os.path.join(path, "config.json")
    try:
        with open(config_file) as f:
            architectures = json.load(f).get("architectures") or []
    except (OSError, ValueError) as e:
        raise ValueError(f"--features: cannot read {config_file}: {e}") from e
    if "StableDiffusionSafetyChecker" in architectures:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        model_cls = StableDiffusionSafetyChecker
    elif architectures == ["CLIPVisionModel"]:
        model_cls = CLIPVisionModel
    else:
        model_cls = CLIPVisionModelWithProjection
    try:
        model, info = model_cls.from_pretrained(path, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"--features: cannot load a CLIP vision model from {path}: {e}") from e
    if info["missing_keys"]:
        raise ValueError(f"--features: {path} lacks weights {sorted(info['missing_keys'])[:5]} for {model_cls.__name__}; "
                         f"it would be randomly initialised")
    if model_cls.__name__ == "StableDiffusionSafetyChecker":
        return model.vision_model, model.visual_projection
    if model_cls is CLIPVisionModel:
        return model, None
    return model.vision_model, model.visual_projection


def load_features(path: Optional[str | os.PathLike] = None, device: str | torch.device = "cpu"):
    """CLIP features from `path` when given, else the deterministic default `RandomConvFeatures`."""
    return ClipFeatures(path, device) if path is not None else RandomConvFeatures(device)


def cosine_i2i(generated: torch.Tensor, real: torch.Tensor) -> float:
    """Mean cosine similarity over all (generated, real) pairs of embeddings (CLIP I2I)."""
    g = F.normalize(generated.double(), dim=1)
    r = F.normalize(real.double(), dim=1)
    return float((g @ r.T).mean())
