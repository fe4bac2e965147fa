"""dcfast.data: concept folders to [-1, 1] tensors, and errors naming the folder or file."""
import pytest
import torch
from PIL import Image

from dcfast.config import TaskConfig
from dcfast.data import check_image_folder, load_images


def test_load_resizes_center_crops_and_normalises(tmp_path):
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGB", (10, 30), (0, 0, 0)).save(tmp_path / "b.jpg")
    (tmp_path / "notes.txt").write_text("ignored")
    images = load_images(tmp_path, 16)
    assert images.shape == (2, 3, 16, 16)
    assert torch.allclose(images[0, 0], torch.ones(16, 16)) and torch.allclose(images[0, 1], -torch.ones(16, 16))
    assert images[1].max() == -1


def test_prompt_template():
    assert TaskConfig(".", "dog").task_prompt("<v1>") == "a photo of <v1> dog"
    assert TaskConfig(".", "mug", "{token} {class_word} on a table").task_prompt("<v2>") == "<v2> mug on a table"


def test_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        check_image_folder(tmp_path / "nope")


def test_folder_without_images(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="contains no images"):
        check_image_folder(tmp_path)


def test_truncated_and_unreadable_images_are_named(tmp_path):
    Image.new("RGB", (32, 32), (9, 9, 9)).save(tmp_path / "good.png")
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.png.*truncated"):
        check_image_folder(tmp_path)
    (tmp_path / "cut.png").unlink()
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="junk.jpg.*unreadable"):
        check_image_folder(tmp_path)
