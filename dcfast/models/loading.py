"""Loading a local diffusers directory, or a Hub id already in the local cache (nothing is downloaded),
into the components training needs; the checks, the kind (SD 1.x/2.x or SDXL) and the fingerprint of a
model directory."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from dcfast.engine.targets import PREDICTION_TYPES


@dataclass
class Components:
    """The parts training needs; `vae` is None for a pixel-space model."""

    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    vae: Optional[AutoencoderKL] = None
    fingerprint: Optional[str] = None  # model_fingerprint of the directory it was read from
    text_encoder_2: Optional[CLIPTextModelWithProjection] = None  # SDXL's second text encoder and tokenizer
    tokenizer_2: Optional[CLIPTokenizer] = None

    @property
    def kind(self) -> str:
        """"sdxl" with a second text encoder, else "sd" (SD 1.x/2.x)."""
        return "sdxl" if self.text_encoder_2 is not None else "sd"

    @property
    def vae_scale_factor(self) -> int:
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """Image side length the model was built for: U-Net sample size times the VAE's downsampling."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor


REQUIRED_SUBFOLDERS = ("unet", "text_encoder", "tokenizer", "scheduler")
SDXL_SUBFOLDERS = ("text_encoder_2", "tokenizer_2")

# model_index.json's pipeline class -> the kind dcfast trains
PIPELINE_KINDS = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}
# classes users bring that dcfast refuses, and why
REFUSED_PIPELINES = {
    "StableDiffusionXLImg2ImgPipeline": "an SDXL refiner (img2img): it refines a base model's latents and has no "
                                        "first text encoder; train the SDXL base model",
    "StableDiffusionInpaintPipeline": "an inpainting model: its U-Net also reads a mask and a masked image",
    "StableDiffusionXLInpaintPipeline": "an inpainting model: its U-Net also reads a mask and a masked image",
}


def model_kind(path: Union[str, Path], field: str = "pretrained_model_name_or_path") -> str:
    """"sd" (SD 1.x/2.x) or "sdxl", from model_index.json's _class_name, read before any weight loads.

    Without model_index.json: "sdxl" when text_encoder_2/ is there, else "sd". Any other pipeline class, a
    refiner or an inpainting model is refused with an error that names the class and what is supported.
    """
    path = Path(path)
    index = path / "model_index.json"
    if not index.is_file():
        return "sdxl" if (path / "text_encoder_2").is_dir() else "sd"
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as error:
        raise ValueError(f"{field}: cannot read {str(index)!r} ({error}); it must be diffusers' model_index.json") from None
    supported = " and ".join(f"{c} ({'SD 1.x/2.x' if k == 'sd' else 'SDXL'})" for c, k in PIPELINE_KINDS.items())
    if name in PIPELINE_KINDS:
        return PIPELINE_KINDS[name]
    why = REFUSED_PIPELINES.get(name) or ("an inpainting model" if "Inpaint" in str(name) else
                                          "a pipeline dcfast does not know")
    raise ValueError(f"{field}: {str(path)!r} is a {name} ({why}); dcfast trains {supported} models")


def check_model_dir(path: Union[str, Path], field: str = "pretrained_model_name_or_path") -> Path:
    """Raise a ValueError naming `field` when `path` is not a local diffusers directory."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{field}: {str(path)!r} is not a directory; point it at a local diffusers model "
                         f"directory (with {', '.join(s + '/' for s in REQUIRED_SUBFOLDERS)}); nothing is downloaded")
    required = REQUIRED_SUBFOLDERS + (SDXL_SUBFOLDERS if model_kind(path, field) == "sdxl" else ())
    missing = [s for s in required if not (path / s).is_dir()]
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
    for file in sorted(f for sub in REQUIRED_SUBFOLDERS + SDXL_SUBFOLDERS + ("vae",) if (root / sub).is_dir()
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




def model_prediction_type(path: Union[str, Path], field: str = "pretrained_model_name_or_path") -> str:
    """The prediction_type in the model's scheduler/scheduler_config.json (read as JSON: no model is loaded).

    epsilon and v_prediction models train and score against their own target; "sample" is refused.
    """
    file = Path(path) / "scheduler" / "scheduler_config.json"
    try:
        kind = json.loads(file.read_text()).get("prediction_type") or "epsilon"
    except (OSError, ValueError, AttributeError) as error:
        raise ValueError(f"{field}: cannot read the scheduler config {str(file)!r} ({error}); the model directory "
                         f"needs scheduler/scheduler_config.json") from None
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"{field}: the model's scheduler ({str(file)!r}) has prediction_type {kind!r}; dcfast "
                         f"supports {' and '.join(PREDICTION_TYPES)} models only: use an epsilon or "
                         f"v-prediction model")
    return kind


def load_components(path: Union[str, Path], revision: Optional[str] = None, variant: Optional[str] = None) -> Components:
    """Read a local diffusers directory or a Hub id from the local cache (local files only, see dcfast.models.hub);
    `variant` picks e.g. the fp16 weight files. No vae/ means the model works in pixel space."""
    from dcfast.models.hub import check_variant, resolve_model

    path = check_model_dir(resolve_model(path, revision))
    check_variant(path, variant)
    kw = dict(local_files_only=True)
    weights = dict(kw, variant=variant) if variant else kw
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **weights).eval() if (path / "vae").is_dir() else None
    second = {}
    if model_kind(path) == "sdxl":
        second = dict(text_encoder_2=CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2",
                                                                                 **weights).eval(),
                      tokenizer_2=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **kw))
    return Components(
        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", **weights).eval(),
        text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **weights).eval(),
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw),
        noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw),
        vae=vae,
        fingerprint=model_fingerprint(path),
        **second,
    )
