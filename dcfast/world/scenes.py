"""The tiny world (docs/world.md): 32x32 scenes drawn in code, its personal concepts and task sequences.

A scene is one shape on a plain background, drawn from named generative factors (the dSprites /
3D Shapes pattern): the factor values are the labels, and `render` turns a batch of factor tuples
into images deterministically. Vectorised numpy with 2x2 supersampling draws several thousand
images per second on one core.

Factors:
    shape       circle, square, triangle, star, ring, cross
    colour      the shape's main colour (8)
    pattern     solid, stripes, dots: stripes and dots are drawn in a second colour (`accent`)
    accent      the second colour of a pattern (ignored for solid)
    background  white, grey, black
    pose        position, scale and rotation jitter, plus pixel noise (not a label)

A personal concept is a fixed factor combination (pose still varies) prompted with a modifier token,
"a photo of <v1> star". The oracle (`dcfast.world.oracle`) reads all four attributes back; a concept's
*defining* attributes (DEFINING), those fidelity requires, are its shape and colour. Sequences of concepts come in two kinds: distinct-class
(each task a different shape) and same-class (every task a star, as several faces in C-LoRA's
CelebA sequences); validation sequences (for choosing hyperparameters) and test sequences (for
reporting) use disjoint concepts.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np

RESOLUTION = 32
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
COLOURS = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 220, 40), "green": (40, 170, 60),
    "teal": (20, 160, 160), "blue": (40, 80, 220), "purple": (140, 50, 180), "pink": (240, 120, 190),
}
COLOUR_NAMES = tuple(COLOURS)
PATTERNS = ("solid", "stripes", "dots")
BACKGROUNDS = {"white": (240, 240, 235), "grey": (128, 128, 128), "black": (22, 22, 26)}
BACKGROUND_NAMES = tuple(BACKGROUNDS)
# The attributes the oracle reads and fidelity checks, with their value names.
ATTRIBUTES: Dict[str, tuple] = {"shape": SHAPES, "colour": COLOUR_NAMES, "pattern": PATTERNS,
                                "background": BACKGROUND_NAMES}
# What concept fidelity requires. Measured on the validation sequence same-class-val with sequential LoRA
# (scripts/world_regime.py; rank 4, 200-400 steps, LoRA lr 1e-3-3e-3, LoRA also on feed-forward and
# time-embedding projections): the concept's colour was learned (oracle 0.88-1.0 at its own state) and lost
# later (0.0-0.06 by state 4), but no run taught the base model a concept's white or black background
# (<= 0.12) or its dots (<= 0.44). Pattern and background stay read and reported, one matrix each.
DEFINING = ("shape", "colour")
SUPERSAMPLE = 2  # 2x2 samples per pixel: smooth edges at a quarter of 4x's cost
NOISE_STD = 3.0  # pixel noise (of 255): renders are photos of the scene, not flat vector art


@dataclass(frozen=True)
class Scene:
    """Factor indices of a batch of scenes (arrays of length N) and their pose."""

    shape: np.ndarray
    colour: np.ndarray
    pattern: np.ndarray
    accent: np.ndarray
    background: np.ndarray
    center: np.ndarray  # (N, 2) pixels
    radius: np.ndarray  # (N,) pixels
    angle: np.ndarray  # (N,) radians
    seed: int  # pixel-noise seed

    def __len__(self) -> int:
        return len(self.shape)


def random_poses(count: int, rng: np.random.Generator) -> Dict[str, np.ndarray]:
    """Position, scale and rotation jitter: radius 8.5-12 px, the shape kept inside the image."""
    radius = rng.uniform(8.5, 12.0, count)
    margin = radius + 1.0
    center = rng.uniform(margin[:, None], RESOLUTION - margin[:, None], (count, 2))
    return {"center": center, "radius": radius, "angle": rng.uniform(0, 2 * np.pi, count)}


def random_scenes(count: int, seed: int) -> Scene:
    """`count` scenes with every factor drawn uniformly (accent != colour), seeded."""
    rng = np.random.default_rng(seed)
    colour = rng.integers(len(COLOURS), size=count)
    accent = (colour + rng.integers(1, len(COLOURS), size=count)) % len(COLOURS)
    return Scene(shape=rng.integers(len(SHAPES), size=count), colour=colour,
                 pattern=rng.integers(len(PATTERNS), size=count), accent=accent,
                 background=rng.integers(len(BACKGROUNDS), size=count), seed=int(rng.integers(2**31)),
                 **random_poses(count, rng))


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Five-point star, outer radius 1, inner 0.45: fold the angle into one half-spike, test one edge."""
    sector = 2 * np.pi / 5
    r, theta = np.hypot(u, v), np.arctan2(v, u)
    psi = sector / 2 - np.abs(np.mod(theta, sector) - sector / 2)  # 0 at a tip, pi/5 at an inner vertex
    x1, y1 = 0.45 * np.cos(sector / 2), 0.45 * np.sin(sector / 2)
    return (x1 - 1.0) * (r * np.sin(psi)) - y1 * (r * np.cos(psi) - 1.0) >= 0  # the origin's side of the edge


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    inside = np.ones(u.shape, dtype=bool)
    for k in range(3):  # equilateral: three half-planes
        a = np.pi / 2 + 2 * np.pi * k / 3
        inside &= u * np.cos(a) + v * np.sin(a) >= -0.55
    return inside


# Inside tests in the shape's own frame, in units of its radius, in SHAPES order.
_SHAPE_MASKS = (
    lambda u, v: u * u + v * v <= 0.92 ** 2,
    lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.78,
    _triangle,
    _star,
    lambda u, v: (u * u + v * v <= 0.95 ** 2) & (u * u + v * v >= 0.55 ** 2),
    lambda u, v: ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.92)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.92)),
)


def _inside(shape: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask (N, S, S) of points inside each image's shape; each test runs on its own images only."""
    out = np.zeros(u.shape, dtype=bool)
    for index, mask in enumerate(_SHAPE_MASKS):
        rows = np.flatnonzero(shape == index)
        if len(rows):
            out[rows] = mask(u[rows], v[rows])
    return out


def _accent_mask(pattern: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where a pattern shows its second colour: stripes 40% duty, period 0.5 radius; dots on a 0.6 grid."""
    out = np.zeros(u.shape, dtype=bool)
    stripes, dots = np.flatnonzero(pattern == 1), np.flatnonzero(pattern == 2)
    out[stripes] = np.mod(u[stripes] / 0.5, 1.0) < 0.4
    du, dv = np.mod(u[dots] / 0.6, 1.0) - 0.5, np.mod(v[dots] / 0.6, 1.0) - 0.5
    out[dots] = du * du + dv * dv < 0.34 ** 2
    return out


def _coverage(mask: np.ndarray) -> np.ndarray:
    """Fraction (N, 32, 32, 1) of each pixel's supersamples where `mask` holds (the antialiasing)."""
    n = mask.shape[0]
    blocks = mask.reshape(n, RESOLUTION, SUPERSAMPLE, RESOLUTION, SUPERSAMPLE)
    return blocks.sum(axis=(2, 4), dtype=np.float32)[..., None] / SUPERSAMPLE ** 2


def render(scene: Scene) -> np.ndarray:
    """Images (N, 32, 32, 3) uint8 of a batch of scenes; the same scene always gives the same image."""
    n, size = len(scene), RESOLUTION * SUPERSAMPLE
    grid = (np.arange(size, dtype=np.float32) + 0.5) / SUPERSAMPLE
    col = lambda a: np.asarray(a, np.float32).reshape(n, 1, 1)  # noqa: E731
    dx, dy = grid[None, None, :] - col(scene.center[:, 0]), grid[None, :, None] - col(scene.center[:, 1])
    cos, sin, radius = np.cos(col(scene.angle)), np.sin(col(scene.angle)), col(scene.radius)
    u, v = (cos * dx + sin * dy) / radius, (-sin * dx + cos * dy) / radius
    inside = _inside(scene.shape, u, v)
    accent = inside & _accent_mask(scene.pattern, u, v)
    main, second = _coverage(inside & ~accent), _coverage(accent)
    palette = np.array(list(COLOURS.values()), np.float32)[:, None, None, :]
    background = np.array(list(BACKGROUNDS.values()), np.float32)[scene.background][:, None, None, :]
    image = background + main * (palette[scene.colour] - background) + second * (palette[scene.accent] - background)
    image += NOISE_STD * np.random.default_rng(scene.seed).standard_normal(image.shape, dtype=np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# --- captions -----------------------------------------------------------------------------------

def caption(shape: int, colour: Optional[int] = None, pattern: Optional[int] = None, accent: Optional[int] = None,
            background: Optional[int] = None) -> str:
    """A caption naming the given factors (None leaves one out), e.g.
    "a photo of a red star with blue stripes on a white background"; "a photo of a star" names the shape only."""
    words = ["a photo of a"] + ([COLOUR_NAMES[colour]] if colour is not None else []) + [SHAPES[shape]]
    if pattern is not None and pattern != 0:
        words += ["with", COLOUR_NAMES[accent]] if accent is not None else ["with"]
        words.append(PATTERNS[pattern])
    if background is not None:
        words += ["on a", BACKGROUND_NAMES[background], "background"]
    return " ".join(words)


def caption_words() -> List[str]:
    """Every word a caption can hold (the tokenizer must know each one whole)."""
    return sorted({w for c in (SHAPES, COLOUR_NAMES, PATTERNS[1:], BACKGROUND_NAMES) for w in c}
                  | {"a", "photo", "of", "with", "on", "background"})


# --- personal concepts and sequences --------------------------------------------------------------

@dataclass(frozen=True)
class Concept:
    """A personal concept: a fixed factor combination; its prompt is "a photo of {token} {shape}"."""

    name: str
    shape: str
    colour: str
    pattern: str
    accent: str
    background: str

    def indices(self) -> Dict[str, int]:
        """Factor indices, keyed as `Scene`'s fields."""
        return {"shape": SHAPES.index(self.shape), "colour": COLOUR_NAMES.index(self.colour),
                "pattern": PATTERNS.index(self.pattern), "accent": COLOUR_NAMES.index(self.accent),
                "background": BACKGROUND_NAMES.index(self.background)}

    def labels(self) -> Dict[str, int]:
        """Every attribute the oracle reads (ATTRIBUTES) as class indices."""
        idx = self.indices()
        return {name: idx[name] for name in ATTRIBUTES}

    def describe(self) -> str:
        """The concept in words (the caption the base model would need to draw it without a token)."""
        idx = self.indices()
        return caption(idx["shape"], idx["colour"], idx["pattern"], idx["accent"], idx["background"])


def _c(name: str, shape: str, colour: str, pattern: str, accent: str, background: str) -> Concept:
    concept = Concept(name, shape, colour, pattern, accent, background)
    concept.indices()  # fail at import on a misspelt factor
    return concept


# Personal concepts are solid shapes: a striped or dotted concept was learned as a blend of its two colours
# (measured on the first design of same-class-test, stars with stripes or dots: sequential LoRA reached
# F[1, 1] = 0.02 over 3 seeds, its samples a teal-orange mix for a teal star with orange stripes).
# Concepts of a sequence differ in colour or shape (a defining attribute), and mostly in background too.
# The first star was teal until the base model drew it green: 3 seeds gave F[1, 1] = 0.05 for a teal star
# on white (samples green, then lost); on the validation sequence green was learned best (F[1, 1] = 0.97).
CONCEPTS = {c.name: c for c in (
    # test: same-class (stars)
    _c("green-star", "star", "green", "solid", "orange", "white"),
    _c("red-star", "star", "red", "solid", "yellow", "black"),
    _c("purple-star", "star", "purple", "solid", "green", "grey"),
    _c("yellow-star", "star", "yellow", "solid", "blue", "black"),
    # test: distinct-class
    _c("blue-ring", "ring", "blue", "solid", "pink", "white"),
    _c("orange-cross", "cross", "orange", "solid", "teal", "grey"),
    _c("green-square", "square", "green", "solid", "red", "black"),
    _c("pink-circle", "circle", "pink", "solid", "blue", "grey"),
    # validation: same-class (triangles)
    _c("green-triangle", "triangle", "green", "solid", "purple", "white"),
    _c("orange-triangle", "triangle", "orange", "solid", "blue", "black"),
    _c("blue-triangle", "triangle", "blue", "solid", "yellow", "grey"),
    _c("pink-triangle", "triangle", "pink", "solid", "teal", "black"),
    # validation: distinct-class
    _c("red-circle", "circle", "red", "solid", "yellow", "white"),
    _c("teal-square", "square", "teal", "solid", "red", "black"),
    _c("yellow-ring", "ring", "yellow", "solid", "purple", "grey"),
    _c("purple-cross", "cross", "purple", "solid", "green", "white"),
)}

# name -> (split, concept names in task order)
SEQUENCES = {
    "same-class-test": ("test", ("green-star", "red-star", "purple-star", "yellow-star")),
    "distinct-class-test": ("test", ("blue-ring", "orange-cross", "green-square", "pink-circle")),
    "same-class-val": ("validation", ("green-triangle", "orange-triangle", "blue-triangle", "pink-triangle")),
    "distinct-class-val": ("validation", ("red-circle", "teal-square", "yellow-ring", "purple-cross")),
}


def get_concept(name: str) -> Concept:
    """A concept by name; ValueError listing the known names."""
    if name not in CONCEPTS:
        raise ValueError(f"unknown world concept {name!r}; known concepts: {', '.join(sorted(CONCEPTS))}")
    return CONCEPTS[name]


def get_sequence(name: str) -> List[Concept]:
    """A named task sequence's concepts in order; ValueError listing the known sequences."""
    if name not in SEQUENCES:
        raise ValueError(f"unknown world sequence {name!r}; known sequences: {', '.join(sorted(SEQUENCES))}")
    return [get_concept(c) for c in SEQUENCES[name][1]]


def concept_scenes(concept: Concept, count: int, seed: int) -> Scene:
    """`count` renders of one concept: fixed factors, jittered pose and noise, seeded."""
    rng = np.random.default_rng(seed)
    idx = concept.indices()
    return Scene(**{k: np.full(count, v) for k, v in idx.items()}, seed=int(rng.integers(2**31)),
                 **random_poses(count, rng))


SPLIT_SEEDS = {"train": 11, "val": 23, "test": 37}  # distinct streams: no render is in two splits
CONCEPT_FILE = "concept.json"  # beside a concept's split folders; marks a world concept for evaluation


def _concept_seed(concept: Concept, split: str, seed: int) -> int:
    return int.from_bytes(concept.name.encode(), "little") % 100_003 * 1000 + SPLIT_SEEDS[split] + 7 * seed


def write_concept(folder: Union[str, Path], concept: Concept, counts: Dict[str, int], seed: int = 0) -> Dict[str, str]:
    """Write `folder/{split}/*.png` per split of `counts` and `folder/concept.json`; return split -> folder."""
    from PIL import Image

    from dcfast.io.atomic import write_json_atomic

    folder = Path(folder)
    paths = {}
    for split, count in counts.items():
        out = folder / split
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob("*.png"):
            stale.unlink()
        for i, image in enumerate(render(concept_scenes(concept, count, _concept_seed(concept, split, seed)))):
            Image.fromarray(image).save(out / f"{concept.name}_{i:03d}.png")
        paths[split] = str(out)
    write_json_atomic(folder / CONCEPT_FILE, asdict(concept))
    return paths


def write_sequence(output_dir: Union[str, Path], sequence: str, num_train: int = 16, num_eval: int = 16,
                   seed: int = 0, num_tasks: Optional[int] = None) -> List[Dict[str, str]]:
    """Write a sequence's concepts under `output_dir/<concept>/` and return its task list.

    Each task is `{"images": train folder, "eval_images": held-out folder, "class_word": shape}`, ready
    for `TrainConfig.from_dict({"tasks": ...})`. Held-out images are the `test` split for test sequences
    and the `val` split for validation sequences: distinct renders, never crops of a training image.
    """
    if num_train < 1 or num_eval < 2:
        raise ValueError(f"num_train must be >= 1 and num_eval >= 2, got {num_train} and {num_eval}")
    split = "test" if SEQUENCES.get(sequence, ("",))[0] == "test" else "val"
    concepts = get_sequence(sequence)
    if num_tasks is not None:
        if not 1 <= num_tasks <= len(concepts):
            raise ValueError(f"num_tasks: {sequence} has {len(concepts)} tasks, got {num_tasks}")
        concepts = concepts[:num_tasks]
    tasks = []
    for concept in concepts:
        paths = write_concept(Path(output_dir) / concept.name, concept, {"train": num_train, split: num_eval}, seed)
        tasks.append({"images": paths["train"], "eval_images": paths[split], "class_word": concept.shape})
    return tasks


def read_concept(images_folder: Union[str, Path]) -> Optional[Concept]:
    """The world concept whose split folder this is (its parent holds concept.json), or None."""
    import json

    path = Path(images_folder).parent / CONCEPT_FILE
    if not path.is_file():
        return None
    try:
        return Concept(**json.loads(path.read_text()))
    except (ValueError, TypeError) as error:
        raise ValueError(f"corrupt world concept file {str(path)!r} ({error}); rewrite it with "
                         f"dcfast.world.scenes.write_sequence") from error


def concepts_in_split(split: str) -> List[str]:
    """Names of the concepts used by the sequences of a split ("test" or "validation")."""
    return [name for s, names in SEQUENCES.values() if s == split for name in names]


def _check_sequences() -> None:
    test, val = set(concepts_in_split("test")), set(concepts_in_split("validation"))
    if test & val:
        raise RuntimeError(f"concepts {sorted(test & val)} are in both test and validation sequences")


_check_sequences()

