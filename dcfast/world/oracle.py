"""The world's oracle: a small CNN that reads a 32x32 image's shape, colour, pattern and background.

It judges generated samples (docs/world.md), as a trained classifier does in small-scale continual
generative learning. Trained on fresh renders with blur, noise and colour jitter by
`scripts/train_oracle.py`, shipped at `dcfast/assets/oracle.safetensors` (with its accuracy per
attribute in `oracle.json`).

**Concept fidelity** of a set of samples of concept i's prompt is the fraction of samples the oracle
judges to carry *every* defining attribute of concept i (`world.DEFINING`: shape and colour); the
fraction for each attribute of `world.ATTRIBUTES` alone is reported beside it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from torch import nn

from dcfast.world.scenes import ATTRIBUTES, DEFINING, RESOLUTION, Concept

ASSETS = Path(__file__).resolve().parents[1] / "assets"
ORACLE_FILE = ASSETS / "oracle.safetensors"
ORACLE_SCRIPT = "python scripts/train_oracle.py"


class Oracle(nn.Module):
    """Four conv stages (16-32-48-64 channels, BatchNorm, ReLU), global average pool, one head per attribute.

    Input: images (N, 3, 32, 32) in [0, 1]. Output: {attribute: logits (N, number of values)}.
    """

    def __init__(self, width: int = 16):
        super().__init__()
        channels = (3, width, 2 * width, 3 * width, 4 * width)
        layers = []
        for stage, (c_in, c_out) in enumerate(zip(channels, channels[1:])):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                       nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            if stage < 3:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({name: nn.Linear(channels[-1], len(values)) for name, values in ATTRIBUTES.items()})

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        pooled = self.features(images * 2 - 1).mean(dim=(2, 3))
        return {name: head(pooled) for name, head in self.heads.items()}


def load_oracle(path: Union[str, Path] = ORACLE_FILE) -> Oracle:
    """The trained oracle (eval mode); ValueError naming the file and the script that makes it."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"oracle: {str(path)!r} does not exist; train it with `{ORACLE_SCRIPT}`")
    try:
        state = load_file(str(path))
        oracle = Oracle()
        oracle.load_state_dict(state)
    except Exception as error:  # a truncated or foreign file: safetensors or load_state_dict says why
        raise ValueError(f"oracle: {str(path)!r} is corrupt or not an oracle ({error}); retrain it with "
                         f"`{ORACLE_SCRIPT}`") from error
    return oracle.eval()


def as_unit_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) or float in [0, 1] -> float32 in [0, 1] at 32x32; ValueError on another layout."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a (N, 3, H, W) tensor, got {tuple(getattr(images, 'shape', ()))}")
    images = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    if images.shape[-1] != RESOLUTION or images.shape[-2] != RESOLUTION:
        images = nn.functional.interpolate(images, size=(RESOLUTION, RESOLUTION), mode="bilinear", antialias=True)
    return images


@torch.no_grad()
def read_attributes(oracle: Oracle, images: torch.Tensor, batch: int = 256) -> Dict[str, torch.Tensor]:
    """The oracle's reading of each image: {attribute: predicted value index (N,)}."""
    images = as_unit_images(images)
    device = next(oracle.parameters()).device
    parts = [oracle(chunk.to(device)) for chunk in images.split(batch)]
    return {name: torch.cat([p[name].argmax(dim=1).cpu() for p in parts]) for name in ATTRIBUTES}


def fidelity(readings: Dict[str, torch.Tensor], concept: Concept) -> Dict[str, float]:
    """Fractions of samples carrying all of the concept's defining attributes ("all"), and each attribute alone."""
    labels = concept.labels()
    hits = {name: readings[name] == labels[name] for name in ATTRIBUTES}
    every = torch.stack([hits[name] for name in DEFINING]).all(dim=0)
    return {"all": float(every.double().mean()), **{name: float(hit.double().mean()) for name, hit in hits.items()}}


def oracle_report(path: Union[str, Path] = ORACLE_FILE) -> Optional[dict]:
    """The shipped oracle's recorded accuracy per attribute (oracle.json beside the weights), if present."""
    report = Path(path).with_suffix(".json")
    return json.loads(report.read_text()) if report.is_file() else None
