"""Builds the demo dataset: scikit-learn's bundled handwritten digits as an ImageFolder (train/ and val/).

1,797 8x8 grey images of 10 classes, upscaled to 64x64 RGB PNGs, split into train and val with a fixed seed
(stratified). Idempotent: a complete dataset already at ``--root`` is left as it is. Complete means that every file
the manifest lists holds the bytes it was written with (their SHA-256 is stored in the manifest; checking the whole
dataset, about 5 MB, takes tens of milliseconds), so a missing, truncated or corrupted file makes it rebuild.

Usage: ``python -m classification.data.digits --root data/digits``
"""
import argparse
import hashlib
import io
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
SPLITS = ("train", "val")
FILES_KEY = "files"  # manifest key: {path relative to the root: SHA-256 of its bytes}
EXAMPLES_LOGGED = 3  # damaged or unexpected files named in a log line


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_manifest(path: Path) -> dict | None:
    """The manifest at ``path``; None when it is missing or unreadable (e.g. truncated)."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _damaged_files(root: Path, files: dict[str, str]) -> list[str]:
    """The listed files that are missing or whose bytes no longer have the listed SHA-256."""
    damaged = []
    for name, digest in files.items():
        try:
            intact = _digest((root / name).read_bytes()) == digest
        except OSError:
            intact = False
        if not intact:
            damaged.append(name)
    return damaged


def _is_complete(root: Path, manifest: dict | None, image_size: int) -> bool:
    """Whether ``root`` holds the dataset ``manifest`` describes, for ``image_size``, with every file intact; logs
    why not, and warns about PNG files in the class folders that the dataset does not list."""
    if manifest is None:
        return False
    files = manifest.get(FILES_KEY)
    if manifest.get("image_size") != image_size or not isinstance(files, dict):
        logger.info("digits dataset at %s was built for another image size or without file hashes: rebuilding", root)
        return False
    damaged = _damaged_files(root, files)
    if damaged:
        logger.warning("digits dataset at %s: %d of %d files missing or corrupt (%s): rebuilding", root, len(damaged),
                       len(files), ", ".join(damaged[:EXAMPLES_LOGGED]))
        return False
    unexpected = sorted(name for split in SPLITS for path in (root / split).glob("*/*.png")
                        if (name := path.relative_to(root).as_posix()) not in files)
    if unexpected:
        logger.warning("digits dataset at %s: %d PNG files that it does not list will be loaded with it (%s)", root,
                       len(unexpected), ", ".join(unexpected[:EXAMPLES_LOGGED]))
    return True


def build_digits(root: str | Path, image_size: int = IMAGE_SIZE) -> dict:
    """Writes ``root/{train,val}/<digit>/<index>.png`` unless a complete dataset is already there.

    Returns:
        The manifest: number of images per split, image size, split seed, and the SHA-256 of every file.
    """
    root = Path(root)
    manifest_path = root / MANIFEST_NAME
    manifest = _read_manifest(manifest_path)
    if _is_complete(root, manifest, image_size):
        logger.info("digits dataset already complete at %s: %s", root, {s: manifest[s] for s in SPLITS})
        return manifest
    digits = load_digits()
    indices = np.arange(len(digits.target))
    train_idx, val_idx = train_test_split(indices, test_size=VAL_FRACTION, random_state=SPLIT_SEED,
                                          stratify=digits.target)
    files = {}
    for split, split_idx in zip(SPLITS, (train_idx, val_idx)):
        for index in split_idx:
            grey = (digits.images[index] / DIGITS_MAX_VALUE * 255.0).round().astype(np.uint8)
            image = Image.fromarray(grey, mode="L").resize((image_size, image_size), Image.Resampling.BICUBIC)
            folder = root / split / str(digits.target[index])
            folder.mkdir(parents=True, exist_ok=True)
            encoded = io.BytesIO()
            image.convert("RGB").save(encoded, format="PNG")
            path = folder / f"{index:04d}.png"
            path.write_bytes(encoded.getvalue())
            files[path.relative_to(root).as_posix()] = _digest(encoded.getvalue())
    manifest = {"train": len(train_idx), "val": len(val_idx), "image_size": image_size, "split_seed": SPLIT_SEED,
                FILES_KEY: files}
    manifest_path.write_text(json.dumps(manifest))
    logger.info("wrote the digits dataset to %s: %s", root, {s: manifest[s] for s in SPLITS})
    return manifest


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data/digits", help="output folder (gets train/ and val/)")
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE, help="side of the upscaled RGB images")
    args = parser.parse_args()
    if args.image_size < 1:
        parser.error(f"--image-size must be >= 1, got {args.image_size}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        build_digits(args.root, args.image_size)
    except OSError as err:  # a root that cannot be created or written
        raise SystemExit(f"digits: cannot write the dataset to {args.root}: {err}") from err


if __name__ == "__main__":
    main()
