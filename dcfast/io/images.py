"""Concept data: image folders, loaded and checked the way training and evaluation both need.

Images are read upright (their EXIF orientation applied, as a phone camera means them), loaded once
per task, resized so the shorter side is the model's resolution (smaller images are upscaled, bicubic,
as diffusers' training scripts do), center-cropped (or, for training steps with center_crop off, cropped
at a random offset, and with random_flip mirrored half the time), and normalised to [-1, 1] as Stable
Diffusion's VAE expects.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Tuple, Union

from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:  # torch and numpy load with the first image tensor: config validation and --help need neither
    import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_PROMPT_TEMPLATE = "a photo of {token} {class_word}"


def find_images(folder: Union[str, Path], field: str = "images") -> List[Path]:
    """Sorted image files of `folder`; ValueError naming `field` and the folder when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{field}: image folder {str(folder)!r} does not exist; create it or fix the path")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"{field}: folder {str(folder)!r} contains no images ({', '.join(IMAGE_EXTENSIONS)}); "
                         f"add the concept's photos there")
    return files


def open_image(path: Path, field: str = "images") -> Image.Image:
    """Decode the whole file to RGB, upright (EXIF orientation applied); ValueError naming the file when it is
    unreadable or truncated."""
    try:
        with Image.open(path) as image:
            image.load()  # decodes every byte: truncated files fail here, not later in training
            return ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"{field}: cannot read image {str(path)!r} ({error}); the file is unreadable or "
                         f"truncated: replace or remove it") from error


def check_image_folder(folder: Union[str, Path], field: str = "images") -> List[Path]:
    """Validate a concept folder: it exists, holds images, and every image decodes completely."""
    files = find_images(folder, field)
    for path in files:
        open_image(path, field)
    return files


def resized(image: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the shorter side to `resolution` (bicubic; up or down), scale to [-1, 1]; (3, h, w) float32."""
    import numpy as np
    import torch

    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def to_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the shorter side to `resolution`, center-crop, scale to [-1, 1]; (3, R, R) float32."""
    image = resized(image, resolution)
    h, w = image.shape[1:]
    top, left = center_offsets(h, w, resolution)
    return image[:, top:top + resolution, left:left + resolution].contiguous()


def center_offsets(height: int, width: int, resolution: int) -> Tuple[int, int]:
    """(top, left) of the centered R x R crop of a (height, width) image."""
    return (height - resolution) // 2, (width - resolution) // 2


def crop_geometry(folder: Union[str, Path], resolution: int, field: str = "images") -> List[Tuple[int, ...]]:
    """Per image of a concept folder (sorted file order): (original height, original width, resized height,
    resized width), what SDXL's size-and-crop time ids are made of."""
    geometry = []
    for path in find_images(folder, field):
        w, h = open_image(path, field).size
        scale = resolution / min(w, h)
        geometry.append((h, w, max(resolution, round(h * scale)), max(resolution, round(w * scale))))
    return geometry


def load_resized(folder: Union[str, Path], resolution: int, field: str = "images") -> List[torch.Tensor]:
    """A concept folder's images, shorter side = `resolution`, uncropped: what `augment` crops per step."""
    return [resized(open_image(p, field), resolution) for p in find_images(folder, field)]


def augment(images: List[torch.Tensor], resolution: int, generator: torch.Generator, *, center_crop: bool = True,
            random_flip: bool = False, offsets: Optional[List[Tuple[int, int]]] = None) -> torch.Tensor:
    """(N, 3, R, R): each image cropped to R x R (centered, or at a random offset) and, with `random_flip`,
    mirrored left-right with probability 1/2. Draws from `generator` only what the options need.

    `offsets`, when given, receives each crop's (top, left) in the returned image's orientation (SDXL's crop ids).
    """
    import torch

    out = []
    for image in images:
        h, w = image.shape[1:]
        if center_crop:
            top, left = center_offsets(h, w, resolution)
        else:
            top = int(torch.randint(h - resolution + 1, (1,), generator=generator))
            left = int(torch.randint(w - resolution + 1, (1,), generator=generator))
        crop = image[:, top:top + resolution, left:left + resolution]
        if random_flip and bool(torch.rand((), generator=generator) < 0.5):
            crop = crop.flip(-1)
            left = w - resolution - left  # where the crop lies in the mirrored image
        out.append(crop)
        if offsets is not None:
            offsets.append((top, left))
    return torch.stack(out)


def load_images(folder: Union[str, Path], resolution: int, field: str = "images") -> torch.Tensor:
    """All images of a concept folder as an (N, 3, R, R) tensor in [-1, 1], in sorted file order."""
    import torch

    return torch.stack([to_tensor(open_image(p, field), resolution) for p in find_images(folder, field)])


def write_shape_images(folder: Union[str, Path], colour, count: int = 3, size=(20, 18)) -> Path:
    """`count` PNGs of a `colour` (RGB) ellipse at shifting positions on white: a synthetic concept."""
    from PIL import ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.new("RGB", size, (255, 255, 255))
        ImageDraw.Draw(image).ellipse((2 + i, 2, 12 + i, 14 - i), fill=colour)
        image.save(folder / f"{i}.png")
    return folder


def to_uint8(images: "torch.Tensor") -> "torch.Tensor":
    """Images (n, 3, H, W) in [0, 1] -> uint8 on the CPU, as PNGs store them."""
    import torch

    return (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
