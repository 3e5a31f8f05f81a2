"""Image loading: 16-bit, 32-bit integer and float images are scaled to 8 bits, not clipped to two levels."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import PILToTensor

from classification.data.build import SafeImageFolder, build_datasets
from classification.data.images import UINT16_PER_UINT8, load_rgb, to_rgb
from test_data import TINY_SIZE, make_image_folder, tiny_config

GRADIENT_SIDE = 16  # a 16 x 16 image holds each 8-bit level 0..255 once
UNIFORM_LEVEL = 100


def gradient() -> np.ndarray:
    """(16, 16) uint8: every level 0..255 once, in raster order."""
    return np.arange(GRADIENT_SIDE * GRADIENT_SIDE, dtype=np.uint8).reshape(GRADIENT_SIDE, GRADIENT_SIDE)


def assert_grey_rgb(image: Image.Image, expected: np.ndarray) -> None:
    pixels = np.asarray(image).astype(int)
    assert image.mode == "RGB" and pixels.shape == (*expected.shape, 3)
    assert np.abs(pixels - expected.astype(int)[..., None]).max() <= 1


@pytest.mark.parametrize("mode, pixels, suffix", [
    ("I;16", gradient().astype(np.uint16) * UINT16_PER_UINT8, "png"),
    ("I", gradient().astype(np.int32) * UINT16_PER_UINT8, "tif"),
    ("I", gradient().astype(np.int32), "tif"),
    ("I", gradient().astype(np.uint16) * UINT16_PER_UINT8, "pgm"),
    ("F", gradient().astype(np.float32) / 255, "tif"),
    ("F", gradient().astype(np.float32), "tif"),
], ids=["16-bit png", "int32 tiff of 16-bit levels", "int32 tiff of 8-bit levels", "16-bit pgm", "float [0, 1] tiff",
        "float [0, 255] tiff"])
def test_high_bit_depth_files_load_as_their_8_bit_levels(tmp_path, mode, pixels, suffix):
    path = tmp_path / f"gradient.{suffix}"
    Image.fromarray(pixels).save(path)
    with Image.open(path) as saved:
        assert saved.mode == mode  # the file really holds the mode under test
    assert_grey_rgb(load_rgb(path), gradient())


def test_a_dark_16_bit_pgm_stays_dark(tmp_path):
    """Pillow opens a 16-bit PGM as mode I: its levels are 16-bit even when none exceeds 255."""
    path = tmp_path / "dark.pgm"
    Image.fromarray(gradient().astype(np.uint16)).save(path)  # 16-bit levels 0..255 of 65535: nearly black
    with Image.open(path) as saved:
        assert saved.mode == "I" and saved.format == "PPM"
    assert_grey_rgb(load_rgb(path), np.round(gradient() / UINT16_PER_UINT8))


@pytest.mark.parametrize("mode, levels, expected", [
    # 16-bit: / 257, rounded (385 = 1.498 x 257, 386 = 1.502 x 257); white stays 255.
    ("I;16", [0, 257, 385, 386, 32896, 65535], [0, 1, 1, 2, 128, 255]),
    # float [0, 1]: x 255, rounded; float [0, 255]: rounded.
    ("F", [0.0, 0.499 / 255, 0.501 / 255, 0.999, 1.0], [0, 0, 1, 255, 255]),
    ("F", [0.0, 2.0, 2.4, 2.6, 254.6], [0, 2, 2, 3, 255]),
], ids=["16-bit", "float unit range", "float 8-bit range"])
def test_high_bit_depth_levels_round_to_the_nearest_8_bit_level_exactly(mode, levels, expected):
    dtype = np.uint16 if mode == "I;16" else np.float32
    image = Image.fromarray(np.array([levels], dtype=dtype))
    assert image.mode == mode
    pixels = np.asarray(to_rgb(image, "in memory"))
    assert pixels[..., 0].tolist() == [expected] and (pixels == pixels[..., :1]).all()


def test_big_endian_16_bit_images_are_scaled():
    image = Image.fromarray((gradient().astype(np.uint16) * UINT16_PER_UINT8).astype(">u2"))
    assert image.mode == "I;16B"
    assert_grey_rgb(to_rgb(image, "in memory"), gradient())


@pytest.mark.parametrize("pixels, message", [
    (np.full((4, 4), -1.0, dtype=np.float32), r"mode F\) with values -1.0..-1.0: only \[0, 1\] or \[0, 255\]"),
    (np.full((4, 4), 300.0, dtype=np.float32), r"mode F\) with values 300.0..300.0"),
    (np.full((4, 4), np.nan, dtype=np.float32), r"mode F\) with values nan"),
    (np.full((4, 4), 70000, dtype=np.int32), r"mode I\) with values 70000..70000: only 0..65535"),
    (np.full((4, 4), -1, dtype=np.int32), r"mode I\) with values -1..-1: only 0..65535"),
])
def test_values_without_an_8_bit_reading_are_rejected_naming_the_file(tmp_path, pixels, message):
    path = tmp_path / "odd.tif"
    Image.fromarray(pixels).save(path)
    with pytest.raises(ValueError, match=f"odd.tif: .*{message}"):
        load_rgb(path)


def test_dataset_items_of_a_16_bit_png_keep_their_levels(tmp_path, caplog):
    """Through SafeImageFolder.__getitem__: the raw levels, then the validation transform of a uniform image; a
    float image out of range is left out of validation like any unreadable image."""
    folder = tmp_path / "raw" / "class0"
    folder.mkdir(parents=True)
    Image.fromarray(gradient().astype(np.uint16) * UINT16_PER_UINT8).save(folder / "gradient.png")
    image, target, skipped = SafeImageFolder(str(tmp_path / "raw"), PILToTensor(), replace_unreadable=True)[0]
    assert (target, skipped, image.dtype) == (0, 0, torch.uint8)
    assert (image.int() - torch.from_numpy(gradient()).int()).abs().max() <= 1

    root = make_image_folder(tmp_path / "folder", classes=2, train_per_class=1, val_per_class=2)
    uniform = np.full((TINY_SIZE, TINY_SIZE), UNIFORM_LEVEL * UINT16_PER_UINT8, dtype=np.uint16)
    Image.fromarray(uniform).save(root / "val" / "class0" / "0.png")
    Image.fromarray(np.full((TINY_SIZE, TINY_SIZE), -1.0, dtype=np.float32)).save(root / "val" / "class1" / "0.tif")
    _, val_set = build_datasets(tiny_config(root))
    image, _, skipped = val_set[0]
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    assert skipped == 0
    torch.testing.assert_close(image, ((UNIFORM_LEVEL / 255 - mean) / std).expand_as(image), atol=1e-5, rtol=0)
    rejected = [path for path, _ in val_set.samples].index(str(root / "val" / "class1" / "0.tif"))
    with caplog.at_level(logging.WARNING):
        assert val_set[rejected][0] is None and val_set[rejected][2] == 1
    assert "0.tif" in caplog.text and "mode F" in caplog.text
