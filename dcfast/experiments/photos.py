"""The demo's personal concepts: real photos shipped inside scikit-image's wheel (`skimage.data`).

Each concept is one photo and a box around its object. Training images are random square crops
around the box (scale and position jitter), mirrored half the time, with colour jitter; held-out
evaluation images are other crops of the same photo from a different random stream, without colour
jitter. All are written as PNG at the base model's resolution. None of these photos is in the tiny
base model's pretraining data (scripts/pretrain_tiny_base.py uses other scikit-image pictures).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageEnhance


@dataclass(frozen=True)
class DemoConcept:
    """A photo of `skimage.data` (`source`, the accessor's name), its class word and object box (x0, y0, x1, y1)."""

    name: str
    class_word: str
    source: str
    box: Tuple[int, int, int, int]


DEMO_CONCEPTS = (
    DemoConcept("cat", "cat", "chelsea", (20, 0, 400, 300)),
    DemoConcept("cup", "cup", "coffee", (70, 0, 540, 400)),
    DemoConcept("rocket", "rocket", "rocket", (180, 100, 480, 420)),
    DemoConcept("horse", "horse", "horse", (0, 0, 400, 328)),
    DemoConcept("person", "person", "astronaut", (40, 0, 400, 420)),
    DemoConcept("motorcycle", "motorcycle", "stereo_motorcycle", (80, 60, 700, 470)),
)


def photo(concept: DemoConcept) -> Image.Image:
    """The concept's full photo as RGB (the horse is a silhouette: drawn black on white)."""
    import skimage.data

    array = getattr(skimage.data, concept.source)()
    if concept.source == "stereo_motorcycle":
        array = array[0]  # (left view, right view, disparity)
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return Image.fromarray(array[..., :3]).convert("RGB")


def crops(concept: DemoConcept, count: int, resolution: int, seed: int, jitter: bool) -> List[Image.Image]:
    """`count` square crops around the concept's box, resized to `resolution` (LANCZOS), seeded.

    Side: 0.8-1.1 x the box's longer side (clipped to the photo); centre shifted up to 10% of the side;
    mirrored with probability 1/2; with `jitter`, brightness, contrast and saturation scaled by 0.85-1.15.
    """
    image = photo(concept)
    rng = np.random.RandomState(seed)
    x0, y0, x1, y1 = concept.box
    out = []
    for _ in range(count):
        side = min(max(x1 - x0, y1 - y0) * rng.uniform(0.8, 1.1), image.width, image.height)
        cx = (x0 + x1) / 2 + rng.uniform(-0.1, 0.1) * side
        cy = (y0 + y1) / 2 + rng.uniform(-0.1, 0.1) * side
        left = float(np.clip(cx - side / 2, 0, image.width - side))
        top = float(np.clip(cy - side / 2, 0, image.height - side))
        crop = image.resize((resolution, resolution), Image.LANCZOS, box=(left, top, left + side, top + side))
        if rng.rand() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        if jitter:
            for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
                crop = enhance(crop).enhance(rng.uniform(0.85, 1.15))
        out.append(crop)
    return out


def select(names: Optional[Sequence[str]] = None, num_tasks: Optional[int] = None) -> List[DemoConcept]:
    """Concepts by name (in the given order), or the first `num_tasks` of DEMO_CONCEPTS."""
    by_name = {c.name: c for c in DEMO_CONCEPTS}
    if names is not None:
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ValueError(f"concepts: unknown demo concept(s) {unknown}; choose from {sorted(by_name)}")
        chosen = [by_name[n] for n in names]
    else:
        chosen = list(DEMO_CONCEPTS)
    if num_tasks is not None:
        if not 1 <= num_tasks <= len(chosen):
            raise ValueError(f"tasks: must be between 1 and {len(chosen)} (demo concepts available), got {num_tasks}")
        chosen = chosen[:num_tasks]
    return chosen


def write_demo_concepts(output_dir: Union[str, Path], num_tasks: Optional[int] = None, resolution: int = 32,
                        num_train: int = 8, num_eval: int = 8, seed: int = 0,
                        names: Optional[Sequence[str]] = None) -> List[Dict[str, str]]:
    """Write `output_dir/<name>/train/*.png` and `.../eval/*.png` per concept; return the task list.

    Each task is `{"images": train folder, "eval_images": eval folder, "class_word": ...}`, ready for
    `TrainConfig.from_dict({"tasks": ...})`. Training and evaluation crops use different seeds.
    """
    if num_train < 1 or num_eval < 2:
        raise ValueError(f"num_train must be >= 1 and num_eval >= 2, got {num_train} and {num_eval}")
    tasks = []
    for k, concept in enumerate(select(names, num_tasks)):
        folders = {}
        for split, count, offset, jitter in (("train", num_train, 0, True), ("eval", num_eval, 500_009, False)):
            folder = Path(output_dir) / concept.name / split
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.glob("*.png"):
                stale.unlink()
            for i, image in enumerate(crops(concept, count, resolution, seed * 1_000_003 + k * 7919 + offset, jitter)):
                image.save(folder / f"{concept.name}_{i:02d}.png")
            folders[split] = str(folder)
        tasks.append({"images": folders["train"], "eval_images": folders["eval"], "class_word": concept.class_word})
    return tasks
