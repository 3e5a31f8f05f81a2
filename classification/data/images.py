"""Opening image files as 8-bit RGB, with high-bit-depth grey images scaled rather than clipped.

Pillow's ``convert("RGB")`` clips 16-bit (``I;16*``), 32-bit integer (``I``) and float (``F``) images to 0..255,
which turns most 16-bit images into two levels. :func:`to_rgb` rescales them instead:

- ``I;16``, ``I;16L``, ``I;16B``, ``I;16N``: 0..65535 maps onto 0..255 (divided by 257, rounded).
- ``I``: a 16-bit PGM/PPM file (Pillow opens those as ``I``) is scaled as above. Otherwise (e.g. an int32 TIFF) values
  in 0..255 are taken as 8-bit levels (as ``convert("RGB")`` reads them), values up to 65535 as 16-bit; any other
  range has no known scale and is rejected. That rule is per image: such a 16-bit image whose maximum is at most 255
  (nearly black) is read as 8-bit.
- ``F``: values in [0, 1] are scaled by 255; otherwise values in [0, 255] are taken as 8-bit levels (rounded);
  negative, larger or non-finite values are rejected. The rule is per image: a 0..255 float image whose maximum is
  at most 1 (nearly black) is read as a [0, 1] image.

A rejected image raises ValueError naming the file, so the datasets treat it like any unreadable image.
Every other mode (RGB, L, RGBA, LA, P, CMYK, ...) goes through Pillow's ``convert("RGB")``.
"""
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# What opening or decoding a file that is not a (whole) image raises (a missing file is an OSError too).
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError)
UINT8_MAX = 255
UINT16_MAX = 65535
UINT16_PER_UINT8 = UINT16_MAX // UINT8_MAX  # 257: v * 257 (0..65535) maps back onto v exactly
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
INT32_MODE = "I"
NETPBM_FORMAT = "PPM"  # Pillow's format name of PGM and PPM files
FLOAT_MODE = "F"
UNIT_RANGE_MAX = 1.0  # an F image whose values all lie in [0, 1] is a [0, 1] image


def _float_to_uint8(pixels: np.ndarray, source: str) -> np.ndarray:
    if not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > UINT8_MAX:
        raise ValueError(f"{source}: float image (mode F) with values {pixels.min()}..{pixels.max()}: only [0, 1] or "
                         f"[0, {UINT8_MAX}] can be read as 8-bit levels")
    scale = UINT8_MAX if pixels.max() <= UNIT_RANGE_MAX else 1
    return np.round(pixels.astype(np.float64) * scale).astype(np.uint8)


def _int_to_uint8(pixels: np.ndarray, mode: str, source: str, sixteen_bit: bool) -> np.ndarray:
    if pixels.min() < 0 or pixels.max() > UINT16_MAX:
        raise ValueError(f"{source}: integer image (mode {mode}) with values {pixels.min()}..{pixels.max()}: only "
                         f"0..{UINT16_MAX} (16-bit) can be read as 8-bit levels")
    if not sixteen_bit and pixels.max() <= UINT8_MAX:
        return pixels.astype(np.uint8)
    return np.round(pixels.astype(np.float64) / UINT16_PER_UINT8).astype(np.uint8)


def to_rgb(image: Image.Image, source: str | Path) -> Image.Image:
    """``image`` as an 8-bit RGB image, high-bit-depth grey modes scaled as the module docstring says.

    Args:
        image: An opened image of any mode.
        source: Where the image came from, for error messages.

    Raises:
        ValueError: An ``I`` or ``F`` image whose values have no 8-bit reading (the message names ``source``).
    """
    if image.mode == FLOAT_MODE:
        grey = _float_to_uint8(np.asarray(image), str(source))
    elif image.mode in SIXTEEN_BIT_MODES or image.mode == INT32_MODE:
        # Pillow opens 16-bit PGM/PPM files as mode I (8-bit ones as L): their values are 16-bit whatever their range.
        sixteen_bit = image.mode in SIXTEEN_BIT_MODES or image.format == NETPBM_FORMAT
        grey = _int_to_uint8(np.asarray(image), image.mode, str(source), sixteen_bit)
    else:
        return image.convert("RGB")
    return Image.fromarray(grey).convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """The image file at ``path`` as 8-bit RGB (the datasets' loader; raises what opening or decoding raises)."""
    with Image.open(path) as image:
        return to_rgb(image, path)
