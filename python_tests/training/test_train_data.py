"""dcfast.io.images: concept folders to [-1, 1] tensors, and errors naming the folder or file."""
import pytest
import torch
from PIL import Image

from dcfast.training.config import TaskConfig
from dcfast.io.images import augment, check_image_folder, load_images, load_resized, open_image


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


def _two_colour(tmp_path, name, orientation=None):
    """A 40x20 (w x h) JPEG stored with its left half red and right half blue, EXIF orientation tag optional."""
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    image.save(tmp_path / name, exif=exif, quality=95)
    return tmp_path / name


def test_exif_orientation_is_applied(tmp_path):
    """Orientation 6 (a phone held upright): shown rotated 90 degrees clockwise, so the stored left half (red)
    is the top half of a 20x40 portrait."""
    assert open_image(_two_colour(tmp_path, "plain.jpg")).size == (40, 20)
    upright = open_image(_two_colour(tmp_path, "phone.jpg", orientation=6))
    assert upright.size == (20, 40)
    pixels = upright.load()
    assert pixels[10, 5][0] > 200 and pixels[10, 5][2] < 60  # top: red
    assert pixels[10, 35][2] > 200 and pixels[10, 35][0] < 60  # bottom: blue
    (tmp_path / "plain.jpg").unlink()
    tensor = load_resized(tmp_path, 20)[0]  # training reads it upright too
    assert tensor.shape == (3, 40, 20) and tensor[0, :15].mean() > 0.8 and tensor[2, 25:].mean() > 0.8


def test_small_images_are_upscaled(tmp_path):
    Image.new("RGB", (8, 12), (0, 255, 0)).save(tmp_path / "small.png")
    images = load_images(tmp_path, 16)
    assert images.shape == (1, 3, 16, 16) and torch.allclose(images[0, 1], torch.ones(16, 16))


def test_augment_crops_and_flips_from_the_generator():
    image = torch.arange(3 * 16 * 40, dtype=torch.float32).view(3, 16, 40)
    centered = augment([image], 16, torch.Generator().manual_seed(0))
    assert torch.equal(centered[0], image[:, :, 12:28])
    slices = {left: image[:, :, left:left + 16] for left in range(25)}
    seen_left, seen_flip = set(), set()
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        crop = augment([image], 16, g, center_crop=False, random_flip=True)[0]
        matches = [(left, flipped) for left, s in slices.items() for flipped in (False, True)
                   if torch.equal(crop, s.flip(-1) if flipped else s)]
        assert len(matches) == 1
        seen_left.add(matches[0][0])
        seen_flip.add(matches[0][1])
    assert len(seen_left) > 5 and seen_flip == {False, True}


def test_training_with_random_crops_and_flips(make_config, concepts):
    from dcfast.training.trainer import train

    result = train(make_config("lora", words=("dog",), center_crop=False, random_flip=True))
    assert torch.isfinite(torch.tensor(result.metrics[0]["final_loss"]))
