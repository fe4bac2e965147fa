"""Fixtures of the trainer tests: a tiny model saved to disk, concept folders of coloured shapes, configs.

Everything is tiny (16x16 images, 8x8 latents, 2-4 steps) and single-threaded: on a loaded 2-core
machine two OpenMP threads per process made a tiny U-Net step ~100x slower.
"""
import sys
from pathlib import Path

import pytest

from dcfast.training.config import TrainConfig
from dcfast.io.images import write_shape_images
from dcfast.models.tiny import tiny

sys.path.insert(0, str(Path(__file__).parent))  # python_tests/training/formulas.py: `import formulas`

COLOURS = {"dog": (200, 60, 20), "mug": (30, 60, 200), "cat": (40, 160, 40)}
# Method settings that keep a test run fast, for the methods that read them.
FAST_SETTINGS = dict(num_dc_timesteps=2, num_dc_concepts=3, fisher_num_timesteps=2, fisher_batch_size=2, dsc_iterations=2)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_model")
    tiny(seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def concepts(tmp_path_factory):
    root = tmp_path_factory.mktemp("concepts")
    return {word: write_shape_images(root / word, colour) for word, colour in COLOURS.items()}


def tiny_config(model_dir, concepts, method: str = "lora", words=("dog", "mug"), **fields) -> TrainConfig:
    """A tiny, fast TrainConfig of `method` on the model in `model_dir`, one task per word of `concepts`; `fields`
    (output_dir among them) override."""
    values = dict(pretrained_model_name_or_path=str(model_dir), method=method,
                  tasks=[{"images": str(concepts[w]), "class_word": w} for w in words],
                  max_train_steps=2, train_batch_size=2, checkpointing_steps=100, learning_rate=1e-3)
    own = TrainConfig(method=method).flat()  # the fast settings below, where the method reads them
    values.update({k: v for k, v in FAST_SETTINGS.items() if k in own})
    values.update(fields)
    return TrainConfig.from_dict(values)


@pytest.fixture
def make_config(model_dir, concepts, tmp_path):
    """make_config(method, words=("dog", "mug"), **fields) -> a tiny, fast TrainConfig."""

    def build(method: str = "lora", words=("dog", "mug"), **fields) -> TrainConfig:
        return tiny_config(model_dir, concepts, method, words, **{"output_dir": str(tmp_path / "run"), **fields})

    return build
