"""The tiny world (docs/world.md): 32x32 scenes drawn in code, its personal concepts and task sequences.

A scene is one shape on a plain background, drawn from named generative factors (the dSprites /
3D Shapes pattern): the factor values are the labels, and `render` turns a batch of factor tuples
into images deterministically. Vectorised numpy with 2x2 supersampling draws several thousand
images per second on one core.

Factors:
    shape       6 base shapes (BASE_SHAPES: circle, square, triangle, star, ring, cross) that the tiny base
                model was pretrained on, and 12 novel ones (NOVEL_SHAPES) that it never saw: personal concepts
                made of them need the LoRA, as a face or a dog does on Stable Diffusion
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

import json

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

RESOLUTION = 32
# The shapes the tiny base model was pretrained on (dcfast/assets/tiny-base/world_factors.json records them)...
BASE_SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
# ...and shapes it never saw, for concepts that only the LoRA can carry. Each is a distinct silhouette under
# rotation (python_tests/world: pairwise IoU over rotations < IOU_BOUND) that the oracle reads (oracle.json).
NOVEL_SHAPES = ("crescent", "heart", "arrow", "bolt", "house", "hourglass", "clover", "tee",
                "ell", "semicircle", "drop", "chevron")
SHAPES = BASE_SHAPES + NOVEL_SHAPES  # indices of the base shapes are those the base model was trained with
# The most a novel shape's mask overlaps another shape's at any rotation (IoU; measured 0.78, square/heart). The base
# shapes keep their old overlaps (circle/square 0.82), which the oracle reads at >= 98%.
IOU_BOUND = 0.8
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
# What concept fidelity requires. Measured on the validation sequence known-same-class-val with sequential LoRA
# (scripts/world_regime.py; rank 4, 200-400 steps, LoRA lr 1e-3-3e-3, LoRA also on feed-forward and
# time-embedding projections): the concept's colour was learned (oracle 0.88-1.0 at its own state) and lost
# later (0.0-0.06 by state 4), but no run taught the base model a concept's white or black background
# (<= 0.12) or its dots (<= 0.44). Pattern and background stay read and reported, one matrix each.
DEFINING = ("shape", "colour")
# The base model's own words, sampled at every task state of a world run: whether the state still draws what the
# text says (evaluation's base fidelity). Four coloured base shapes; none is a novel sequence's class word "circle".
BASE_PROMPT_FACTORS = (("triangle", "red"), ("star", "blue"), ("square", "yellow"), ("cross", "green"))
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


def random_scenes(count: int, seed: int, shapes: Sequence[str] = SHAPES) -> Scene:
    """`count` scenes with every factor drawn uniformly from `shapes` and the other factors (accent != colour), seeded.

    The base model's pretraining draws from BASE_SHAPES only (the same stream as before the novel shapes existed);
    the oracle from every shape."""
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown or not shapes:
        raise ValueError(f"shapes: unknown {unknown} (or none given); choose from {', '.join(SHAPES)}")
    rng = np.random.default_rng(seed)
    colour = rng.integers(len(COLOURS), size=count)
    accent = (colour + rng.integers(1, len(COLOURS), size=count)) % len(COLOURS)
    indices = np.array([SHAPES.index(name) for name in shapes])
    return Scene(shape=indices[rng.integers(len(shapes), size=count)], colour=colour,
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


def _polygon(*vertices):
    """Inside test of a simple polygon (even-odd crossings; convex or not), vertices in units of the radius."""
    edges = list(zip(vertices, vertices[1:] + vertices[:1]))

    def inside(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        out = np.zeros(u.shape, dtype=bool)
        for (x1, y1), (x2, y2) in edges:
            if y1 != y2:
                out ^= ((y1 > v) != (y2 > v)) & (u < (x2 - x1) * (v - y1) / (y2 - y1) + x1)
        return out
    return inside


def _disc(cx: float, cy: float, r: float):
    return lambda u, v: (u - cx) ** 2 + (v - cy) ** 2 <= r * r


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The implicit heart (x^2 + y^2 - 1)^3 <= x^2 y^3, scaled into the unit disc, point down."""
    x, y = 1.4 * u, -1.3 * v + 0.25
    return (x * x + y * y - 1) ** 3 <= x * x * y ** 3


def _union(*masks):
    def inside(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        out = masks[0](u, v)
        for mask in masks[1:]:
            out |= mask(u, v)
        return out
    return inside


# Inside tests in the shape's own frame, in units of its radius, in SHAPES order: the base shapes, then the novel.
_SHAPE_MASKS = (
    lambda u, v: u * u + v * v <= 0.92 ** 2,
    lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.78,
    _triangle,
    _star,
    lambda u, v: (u * u + v * v <= 0.95 ** 2) & (u * u + v * v >= 0.55 ** 2),
    lambda u, v: ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.92)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.92)),
    # novel
    lambda u, v: (u * u + v * v <= 0.95 ** 2) & ((u - 0.42) ** 2 + v * v >= 0.72 ** 2),  # crescent
    _heart,
    _polygon((-0.9, -0.22), (0.1, -0.22), (0.1, -0.62), (0.92, 0.0), (0.1, 0.62), (0.1, 0.22), (-0.9, 0.22)),  # arrow
    _polygon((-0.25, -0.92), (0.45, -0.92), (0.12, -0.15), (0.5, -0.15), (-0.3, 0.92), (-0.05, 0.12),
             (-0.45, 0.12)),  # bolt
    _polygon((-0.6, 0.8), (0.6, 0.8), (0.6, 0.05), (0.8, 0.05), (0.0, -0.8), (-0.8, 0.05), (-0.6, 0.05)),  # house
    _polygon((-0.66, -0.85), (0.66, -0.85), (0.1, 0.0), (0.66, 0.85), (-0.66, 0.85), (-0.1, 0.0)),  # hourglass
    _union(*(_disc(0.56 * np.cos(a), 0.56 * np.sin(a), 0.38) for a in (np.pi / 2, 7 * np.pi / 6, 11 * np.pi / 6)),
           _disc(0.0, 0.0, 0.22)),  # clover
    _polygon((-0.78, -0.75), (0.78, -0.75), (0.78, -0.33), (0.21, -0.33), (0.21, 0.92), (-0.21, 0.92),
             (-0.21, -0.33), (-0.78, -0.33)),  # tee
    _polygon((-0.6, -0.86), (-0.16, -0.86), (-0.16, 0.42), (0.62, 0.42), (0.62, 0.84), (-0.6, 0.84)),  # ell
    lambda u, v: (u * u + (v - 0.3) ** 2 <= 0.92 ** 2) & (v <= 0.3),  # semicircle
    _union(_disc(0.0, 0.38, 0.55), _polygon((0.0, -0.95), (0.5, 0.15), (-0.5, 0.15))),  # drop
    _polygon((-0.62, -0.85), (-0.05, -0.85), (0.75, 0.0), (-0.05, 0.85), (-0.62, 0.85), (0.18, 0.0)),  # chevron
)


def _inside(shape: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask (N, S, S) of points inside each image's shape; each test runs on its own images only."""
    out = np.zeros(u.shape, dtype=bool)
    for index, mask in enumerate(_SHAPE_MASKS):
        rows = np.flatnonzero(shape == index)
        if len(rows):
            out[rows] = mask(u[rows], v[rows])
    return out


def shape_mask(shape: str, angle: float = 0.0, size: int = 97, extent: float = 1.2) -> np.ndarray:
    """Boolean (size, size) mask of a shape rotated by `angle`, on a grid over [-extent, extent]^2 in units of its
    radius: the silhouette the renderer draws, for checks of where shapes lie and how much they overlap."""
    grid = np.linspace(-extent, extent, size, dtype=np.float32)
    x, y = np.meshgrid(grid, grid)
    u, v = np.cos(angle) * x + np.sin(angle) * y, -np.sin(angle) * x + np.cos(angle) * y
    return _SHAPE_MASKS[SHAPES.index(shape)](u[None], v[None])[0]


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
    """Every word a pretraining caption can hold (the tokenizer must know each one whole); the novel shapes have
    no words: the base model never saw them, and concepts made of them are prompted with a base shape's word."""
    return sorted({w for c in (BASE_SHAPES, COLOUR_NAMES, PATTERNS[1:], BACKGROUND_NAMES) for w in c}
                  | {"a", "photo", "of", "with", "on", "background"})


# --- personal concepts and sequences --------------------------------------------------------------

@dataclass(frozen=True)
class Concept:
    """A personal concept: a fixed factor combination; its prompt is "a photo of {token} {class word}"."""

    name: str
    shape: str
    colour: str
    pattern: str
    accent: str
    background: str
    # The word its prompt names, "a photo of <v1> {class_word}": a word the base model knows. None: the shape's own
    # name (a base shape); a novel shape has no word of its own and names the nearest base shape (a same-class
    # sequence names its shared word instead).
    class_word: Optional[str] = None

    @property
    def word(self) -> str:
        """The class word of a task made of this concept alone (a same-class sequence may name another)."""
        return self.class_word or self.shape

    @property
    def novel(self) -> bool:
        """Made of a shape the base model never saw."""
        return self.shape in NOVEL_SHAPES

    def indices(self) -> Dict[str, int]:
        """Factor indices, keyed as `Scene`'s fields."""
        return {"shape": SHAPES.index(self.shape), "colour": COLOUR_NAMES.index(self.colour),
                "pattern": PATTERNS.index(self.pattern), "accent": COLOUR_NAMES.index(self.accent),
                "background": BACKGROUND_NAMES.index(self.background)}

    def labels(self) -> Dict[str, int]:
        """Every attribute the oracle reads (ATTRIBUTES) as class indices."""
        idx = self.indices()
        return {name: idx[name] for name in ATTRIBUTES}



def _c(name: str, shape: str, colour: str, pattern: str, accent: str, background: str,
       class_word: Optional[str] = None) -> Concept:
    concept = Concept(name, shape, colour, pattern, accent, background, class_word)
    concept.indices()  # fail at import on a misspelt factor
    if concept.word not in BASE_SHAPES:
        raise ValueError(f"concept {name!r}: its class word {concept.word!r} is not a word the base model knows")
    return concept


# Personal concepts are solid shapes: a striped or dotted concept was learned as a blend of its two colours
# (measured on the first design of known-same-class-test, stars with stripes or dots: sequential LoRA reached
# F[1, 1] = 0.02 over 3 seeds, its samples a teal-orange mix for a teal star with orange stripes).
# Concepts of a sequence differ in colour or shape (a defining attribute), and mostly in background too.
# The first star was teal until the base model drew it green: 3 seeds gave F[1, 1] = 0.05 for a teal star
# on white (samples green, then lost); on the validation sequence green was learned best (F[1, 1] = 0.97).
CONCEPTS = {c.name: c for c in (
    # known attributes, test: same-class (stars)
    _c("green-star", "star", "green", "solid", "orange", "white"),
    _c("red-star", "star", "red", "solid", "yellow", "black"),
    _c("purple-star", "star", "purple", "solid", "green", "grey"),
    _c("yellow-star", "star", "yellow", "solid", "blue", "black"),
    # known attributes, test: distinct-class
    _c("blue-ring", "ring", "blue", "solid", "pink", "white"),
    _c("orange-cross", "cross", "orange", "solid", "teal", "grey"),
    _c("green-square", "square", "green", "solid", "red", "black"),
    _c("pink-circle", "circle", "pink", "solid", "blue", "grey"),
    # known attributes, validation: same-class (triangles)
    _c("green-triangle", "triangle", "green", "solid", "purple", "white"),
    _c("orange-triangle", "triangle", "orange", "solid", "blue", "black"),
    _c("blue-triangle", "triangle", "blue", "solid", "yellow", "grey"),
    _c("pink-triangle", "triangle", "pink", "solid", "teal", "black"),
    # known attributes, validation: distinct-class
    _c("red-circle", "circle", "red", "solid", "yellow", "white"),
    _c("teal-square", "square", "teal", "solid", "red", "black"),
    _c("yellow-ring", "ring", "yellow", "solid", "purple", "grey"),
    _c("purple-cross", "cross", "purple", "solid", "green", "white"),
    # novel shapes, test (8 shapes: crescent .. tee); the first four make novel-same-class-test
    _c("green-crescent", "crescent", "green", "solid", "orange", "white", class_word="ring"),
    _c("red-heart", "heart", "red", "solid", "yellow", "black", class_word="circle"),
    _c("blue-arrow", "arrow", "blue", "solid", "pink", "grey", class_word="triangle"),
    _c("yellow-bolt", "bolt", "yellow", "solid", "blue", "black", class_word="star"),
    _c("purple-house", "house", "purple", "solid", "green", "white", class_word="square"),
    _c("pink-hourglass", "hourglass", "pink", "solid", "teal", "grey", class_word="triangle"),
    _c("orange-clover", "clover", "orange", "solid", "teal", "white", class_word="circle"),
    _c("teal-tee", "tee", "teal", "solid", "red", "black", class_word="cross"),
    # novel shapes, test: distinct-class (other colours of four test shapes, each with its own class word)
    _c("blue-house", "house", "blue", "solid", "pink", "white", class_word="square"),
    _c("orange-hourglass", "hourglass", "orange", "solid", "teal", "grey", class_word="triangle"),
    _c("green-clover", "clover", "green", "solid", "red", "black", class_word="circle"),
    _c("pink-tee", "tee", "pink", "solid", "blue", "grey", class_word="cross"),
    # novel shapes, validation (4 shapes no test concept has: ell, semicircle, drop, chevron)
    _c("green-ell", "ell", "green", "solid", "purple", "white", class_word="square"),
    _c("orange-semicircle", "semicircle", "orange", "solid", "blue", "black", class_word="circle"),
    _c("blue-drop", "drop", "blue", "solid", "yellow", "grey", class_word="circle"),
    _c("pink-chevron", "chevron", "pink", "solid", "teal", "black", class_word="triangle"),
    _c("red-drop", "drop", "red", "solid", "yellow", "white", class_word="circle"),
    _c("teal-ell", "ell", "teal", "solid", "red", "black", class_word="square"),
    _c("yellow-chevron", "chevron", "yellow", "solid", "purple", "grey", class_word="triangle"),
    _c("purple-semicircle", "semicircle", "purple", "solid", "green", "white", class_word="ring"),
)}


class SequenceSpec(NamedTuple):
    """A named task sequence: its split ("test" or "validation"), its concepts in task order, and the class word
    every task shares (same-class sequences), or None for each concept's own (`Concept.word`)."""

    split: str
    concepts: Tuple[str, ...]
    class_word: Optional[str] = None


# The class word of the novel same-class sequences. It must be a word the base model knows (a base shape), and it
# pulls samples toward its own shape; chosen on the validation sequences (benchmarks/world_regime.md).
NOVEL_CLASS_WORD = "circle"
_NOVEL_TEST = ("green-crescent", "red-heart", "blue-arrow", "yellow-bolt", "purple-house", "pink-hourglass",
               "orange-clover", "teal-tee")
SEQUENCES: Dict[str, SequenceSpec] = {
    # Novel concepts (shapes the base model never saw): the yardstick. The 4-task test is the 8-task one's start,
    # so forgetting at state 4 and state 8 compare directly.
    "novel-same-class-test": SequenceSpec("test", _NOVEL_TEST[:4], NOVEL_CLASS_WORD),
    "novel-same-class-long-test": SequenceSpec("test", _NOVEL_TEST, NOVEL_CLASS_WORD),
    "novel-distinct-class-test": SequenceSpec("test", ("blue-house", "orange-hourglass", "green-clover", "pink-tee")),
    "novel-same-class-val": SequenceSpec("validation", ("green-ell", "orange-semicircle", "blue-drop", "pink-chevron"),
                                         NOVEL_CLASS_WORD),
    "novel-distinct-class-val": SequenceSpec("validation", ("red-drop", "teal-ell", "yellow-chevron",
                                                            "purple-semicircle")),
    # Known attributes (shapes, colours and backgrounds the base model draws from words): a token alone can carry
    # them (textual inversion), so they show less; reported beside the novel ones.
    "known-same-class-test": SequenceSpec("test", ("green-star", "red-star", "purple-star", "yellow-star")),
    "known-distinct-class-test": SequenceSpec("test", ("blue-ring", "orange-cross", "green-square", "pink-circle")),
    "known-same-class-val": SequenceSpec("validation", ("green-triangle", "orange-triangle", "blue-triangle",
                                                        "pink-triangle")),
    "known-distinct-class-val": SequenceSpec("validation", ("red-circle", "teal-square", "yellow-ring",
                                                            "purple-cross")),
}
# Names before the novel-concept world: they now name the known-attribute sequences (an error points to them).
RENAMED_SEQUENCES = {name: f"known-{name}" for name in ("same-class-test", "distinct-class-test", "same-class-val",
                                                        "distinct-class-val")}


def get_concept(name: str) -> Concept:
    """A concept by name; ValueError listing the known names."""
    if name not in CONCEPTS:
        raise ValueError(f"unknown world concept {name!r}; known concepts: {', '.join(sorted(CONCEPTS))}")
    return CONCEPTS[name]


def get_sequence(name: str) -> List[Concept]:
    """A named task sequence's concepts in order; ValueError listing the known sequences."""
    return [get_concept(c) for c in sequence_spec(name).concepts]


def sequence_spec(name: str) -> SequenceSpec:
    """A named sequence's split, concepts and class word; ValueError listing the names (and the new name of an old one)."""
    if name not in SEQUENCES:
        renamed = (f"; {name!r} is now {RENAMED_SEQUENCES[name]!r} (the known-attribute sequences)"
                   if name in RENAMED_SEQUENCES else "")
        raise ValueError(f"unknown world sequence {name!r}{renamed}; known sequences: {', '.join(SEQUENCES)}")
    return SEQUENCES[name]


def class_words(name: str) -> List[str]:
    """Each task's class word in a named sequence: the shared one of a same-class sequence, else each concept's."""
    spec = sequence_spec(name)
    return [spec.class_word or get_concept(c).word for c in spec.concepts]


# A novel concept is photographed upright, as a personal object mostly is: its rotation is within +-NOVEL_TILT
# radians, where the base shapes turn freely. (Measured: see benchmarks/world_regime.md.)
NOVEL_TILT = 0.35


def concept_scenes(concept: Concept, count: int, seed: int) -> Scene:
    """`count` renders of one concept: fixed factors, jittered pose and noise, seeded."""
    rng = np.random.default_rng(seed)
    idx = concept.indices()
    poses = random_poses(count, rng)
    if concept.novel:  # the same draws, the angle mapped from [0, 2 pi) onto [-tilt, tilt)
        poses["angle"] = (poses["angle"] / np.pi - 1.0) * NOVEL_TILT
    return Scene(**{k: np.full(count, v) for k, v in idx.items()}, seed=int(rng.integers(2**31)), **poses)


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

    Each task is `{"images": train folder, "eval_images": held-out folder, "class_word": word}`, ready
    for `TrainConfig.from_dict({"tasks": ...})`. Held-out images are the `test` split for test sequences
    and the `val` split for validation sequences: distinct renders, never crops of a training image.
    """
    if num_train < 1 or num_eval < 2:
        raise ValueError(f"num_train must be >= 1 and num_eval >= 2, got {num_train} and {num_eval}")
    split = "test" if sequence_spec(sequence).split == "test" else "val"
    concepts, words = get_sequence(sequence), class_words(sequence)
    if num_tasks is not None:
        if not 1 <= num_tasks <= len(concepts):
            raise ValueError(f"num_tasks: {sequence} has {len(concepts)} tasks, got {num_tasks}")
        concepts = concepts[:num_tasks]
    tasks = []
    for concept, word in zip(concepts, words):
        paths = write_concept(Path(output_dir) / concept.name, concept, {"train": num_train, split: num_eval}, seed)
        tasks.append({"images": paths["train"], "eval_images": paths[split], "class_word": word})
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
    return [name for spec in SEQUENCES.values() if spec.split == split for name in spec.concepts]


# --- what the base model saw ----------------------------------------------------------------------

TRAINING_FACTORS_FILE = "world_factors.json"  # in a base model's folder: the world factors it was pretrained on


def base_training_factors() -> Dict[str, List[str]]:
    """The factors scripts/pretrain_tiny_base.py trains on: the base shapes only, every colour, pattern, background."""
    return {"shapes": list(BASE_SHAPES), "colours": list(COLOUR_NAMES), "patterns": list(PATTERNS),
            "backgrounds": list(BACKGROUND_NAMES)}


def write_training_factors(model_dir: Union[str, Path]) -> Path:
    """Record in a base model's folder the factors it was pretrained on (`base_training_factors`)."""
    from dcfast.io.atomic import write_json_atomic

    path = Path(model_dir) / TRAINING_FACTORS_FILE
    write_json_atomic(path, base_training_factors())
    return path


def check_unseen(model_dir: Union[str, Path], concepts: Sequence[Concept]) -> None:
    """ValueError unless the base model's record says it never saw the novel shape of any of `concepts`.

    A novel-concept yardstick means nothing on a base that learned the shapes: the LoRA would not have to carry them.
    """
    novel = sorted({c.shape for c in concepts if c.novel})
    if not novel:
        return
    path = Path(model_dir) / TRAINING_FACTORS_FILE
    try:
        seen = json.loads(path.read_text())["shapes"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"base model {str(model_dir)!r}: no readable record of the world factors it was trained on "
                         f"({str(path)!r}: {error}); novel-concept sequences need one, written by "
                         f"scripts/pretrain_tiny_base.py") from error
    both = [shape for shape in novel if shape in seen]
    if both:
        raise ValueError(f"base model {str(model_dir)!r} was trained on the novel shape(s) {', '.join(both)} "
                         f"({str(path)!r}): it can draw them from words, so the LoRA need not carry them; use a "
                         f"base pretrained with them held out (scripts/pretrain_tiny_base.py)")


def _check_sequences() -> None:
    test, val = set(concepts_in_split("test")), set(concepts_in_split("validation"))
    if test & val:
        raise RuntimeError(f"concepts {sorted(test & val)} are in both test and validation sequences")
    shapes = {split: {CONCEPTS[c].shape for c in names if CONCEPTS[c].novel} for split, names in (("test", test), ("val", val))}
    if shapes["test"] & shapes["val"]:
        raise RuntimeError(f"novel shapes {sorted(shapes['test'] & shapes['val'])} are in both test and validation")


_check_sequences()

