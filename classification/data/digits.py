"""Builds the demo dataset: scikit-learn's bundled handwritten digits as an ImageFolder (train/ and val/).

1,797 8x8 grey images of 10 classes, upscaled to 64x64 RGB PNGs, split into train and val with a fixed seed
(stratified). Idempotent: a complete dataset already at ``--root`` is left as it is.

Usage: ``python -m classification.data.digits --root data/digits``
"""
import argparse
import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

logger = logging.getLogger(__name__)

IMAGE_SIZE = 64
VAL_FRACTION = 0.2
SPLIT_SEED = 0
DIGITS_MAX_VALUE = 16  # load_digits pixels are integers 0..16
MANIFEST_NAME = "manifest.json"


def build_digits(root: str | Path, image_size: int = IMAGE_SIZE) -> dict:
    """Writes ``root/{train,val}/<digit>/<index>.png`` unless a complete dataset is already there.

    Returns:
        The manifest: number of images per split, image size, split seed.
    """
    root = Path(root)
    manifest_path = root / MANIFEST_NAME
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        on_disk = {split: len(list((root / split).glob("*/*.png"))) for split in ("train", "val")}
        if manifest.get("image_size") == image_size and all(on_disk[s] == manifest[s] for s in on_disk):
            logger.info("digits dataset already complete at %s: %s", root, on_disk)
            return manifest
    digits = load_digits()
    indices = np.arange(len(digits.target))
    train_idx, val_idx = train_test_split(indices, test_size=VAL_FRACTION, random_state=SPLIT_SEED,
                                          stratify=digits.target)
    for split, split_idx in (("train", train_idx), ("val", val_idx)):
        for index in split_idx:
            grey = (digits.images[index] / DIGITS_MAX_VALUE * 255.0).round().astype(np.uint8)
            image = Image.fromarray(grey, mode="L").resize((image_size, image_size), Image.Resampling.BICUBIC)
            folder = root / split / str(digits.target[index])
            folder.mkdir(parents=True, exist_ok=True)
            image.convert("RGB").save(folder / f"{index:04d}.png")
    manifest = {"train": len(train_idx), "val": len(val_idx), "image_size": image_size, "split_seed": SPLIT_SEED}
    manifest_path.write_text(json.dumps(manifest))
    logger.info("wrote the digits dataset to %s: %s", root, manifest)
    return manifest


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data/digits", help="output folder (gets train/ and val/)")
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE, help="side of the upscaled RGB images")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        build_digits(args.root, args.image_size)
    except OSError as err:  # a root that cannot be created or written
        raise SystemExit(f"digits: cannot write the dataset to {args.root}: {err}") from err


if __name__ == "__main__":
    main()
