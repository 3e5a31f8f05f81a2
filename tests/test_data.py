"""Data: folder checks, corrupt images, resumable/distributed sampling, seeded augmentation, the digits builder."""
import argparse
import json
import logging
import multiprocessing
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.random_erasing import RandomErasing
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from classification.config import get_config
from classification.data.build import (
    DatasetError, DatasetNotFoundError, ResumableDistributedSampler, SafeImageFolder, ShardSampler, _val_loader,
    build_datasets, build_eval_loader, build_loader, build_mixup, build_transform, sample_seed,
)
from classification.data.digits import build_digits

TINY_SIZE = 32


def make_image_folder(root: Path, classes: int = 2, train_per_class: int = 8, val_per_class: int = 4,
                      size: int = TINY_SIZE, seed: int = 0) -> Path:
    """A learnable ImageFolder (each class has its own mean colour) with train/ and val/ of PNGs."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label in range(classes):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            colour = np.array([255 * (label % 2), 255 * ((label // 2) % 2), 128])
            for i in range(count):
                pixels = np.clip(colour + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def tiny_config(data_path: Path, *opts: str):
    """Config for the tiny folder: 32x32, no augmentation noise beyond crop/flip, main-process loading."""
    return get_config(argparse.Namespace(data_path=str(data_path), opts=[
        "MODEL.NUM_CLASSES", "2", "DATA.IMG_SIZE", str(TINY_SIZE), "DATA.BATCH_SIZE", "4", "DATA.NUM_WORKERS", "0",
        "AUG.AUTO_AUGMENT", "''", "AUG.MIXUP", "0.0", "AUG.CUTMIX", "0.0", *opts]), world_size=1)


def test_missing_empty_and_mismatched_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no dataset given: set --data-path DIR \(DATA.DATA_PATH\)"):
        build_datasets(tiny_config(""))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_datasets(tiny_config(tmp_path / "none"))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"train is empty"):
        build_datasets(tiny_config(tmp_path / "empty"))
    (tmp_path / "empty" / "train" / "a").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        build_datasets(tiny_config(tmp_path / "empty"))
    root = make_image_folder(tmp_path / "mismatch", classes=2, train_per_class=1, val_per_class=1)
    (root / "val" / "class1").rename(root / "val" / "other")
    with pytest.raises(ValueError, match=r"only in train \['class1'\], only in val \['other'\]"):
        build_datasets(tiny_config(root))


def test_hidden_folders_are_not_classes_and_spare_outputs_are_named(tmp_path, caplog):
    """A notebook's .ipynb_checkpoints/ in train/ and val/ would be class 0 and shift every real label by one; a
    folder with fewer classes than MODEL.NUM_CLASSES trains, with a warning."""
    root = make_image_folder(tmp_path / "data", classes=2, train_per_class=1, val_per_class=1)
    for split in ("train", "val"):
        hidden = root / split / ".ipynb_checkpoints"
        hidden.mkdir()
        shutil.copy(next((root / split / "class1").iterdir()), hidden / "copy.png")
    with caplog.at_level(logging.WARNING):
        train_set, val_set = build_datasets(tiny_config(root))
    assert train_set.classes == val_set.classes == ["class0", "class1"]
    assert train_set.class_to_idx == {"class0": 0, "class1": 1} and len(train_set) == 2
    assert "outputs are never a target" not in caplog.text
    with caplog.at_level(logging.WARNING):
        build_datasets(tiny_config(root, "MODEL.NUM_CLASSES", "5"))
    assert "has 2 classes and MODEL.NUM_CLASSES is 5: the model's other 3 outputs are never a target" in caplog.text
    only_hidden = tmp_path / "hidden" / "train" / ".cache"
    only_hidden.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"train is empty"):
        build_datasets(tiny_config(tmp_path / "hidden"))


def test_eval_labels_val_images_by_the_trained_class_list(tmp_path, caplog):
    """ImageFolder numbers the folders it finds: a val/ without class1 of 3 would label class2's images 1. With the
    trained class list each folder keeps its trained label; a class the weights never saw is an error. Without a list,
    fewer classes than the model's outputs is a warning, more an error."""
    root = make_image_folder(tmp_path / "data", classes=3, train_per_class=1, val_per_class=2)
    trained = ["class0", "class1", "class2"]
    config = tiny_config(root, "MODEL.NUM_CLASSES", "3")
    full = build_eval_loader(config, 0, 1, pin_memory=False, trained_classes=trained).dataset
    assert [target for _, target in full.samples] == [0, 0, 1, 1, 2, 2]
    shutil.rmtree(root / "val" / "class1")
    subset = build_eval_loader(config, 0, 1, pin_memory=False, trained_classes=trained)
    assert [target for _, target in subset.dataset.samples] == [0, 0, 2, 2]
    assert [int(target) for _, targets, _ in subset for target in targets] == [0, 0, 2, 2]
    with caplog.at_level(logging.WARNING):
        unlisted = build_eval_loader(config, 0, 1, pin_memory=False, trained_classes=None)
    assert [target for _, target in unlisted.dataset.samples] == [0, 0, 1, 1]  # the folders' order: a warning says so
    assert "holds 2 class folders and the model has 3 outputs; these weights carry no class list" in caplog.text
    with pytest.raises(DatasetError, match=r"holds 2 class folders, more than the model's 1 outputs"):
        build_eval_loader(tiny_config(root, "MODEL.NUM_CLASSES", "1"), 0, 1, pin_memory=False, trained_classes=None)
    (root / "val" / "class1").mkdir()
    shutil.copy(root / "val" / "class0" / "0.png", root / "val" / "class1" / "0.png")
    (root / "val" / "class1").rename(root / "val" / "zebra")
    with pytest.raises(DatasetError, match=r"holds classes the weights were not trained on: zebra \(1 of 3"):
        build_eval_loader(config, 0, 1, pin_memory=False, trained_classes=trained)


def test_too_few_training_images_for_one_batch_say_what_to_change(tmp_path):
    root = make_image_folder(tmp_path, classes=2, train_per_class=3, val_per_class=1)
    with pytest.raises(DatasetError, match=r"6 training images give no full batch of 4 per process over 2 "
                                           r"process\(es\): give a smaller --batch-size \(DATA.BATCH_SIZE\)"):
        build_loader(tiny_config(root), rank=0, world_size=2, pin_memory=False)
    assert len(build_loader(tiny_config(root), rank=0, world_size=1, pin_memory=False).train_loader) == 1


def test_corrupt_image_is_skipped_and_counted(tmp_path, caplog):
    root = make_image_folder(tmp_path, classes=2, train_per_class=4, val_per_class=2)
    (root / "train" / "class0" / "1.png").write_bytes(b"not a png")
    (root / "train" / "class1" / "2.png").write_bytes(Image.new("RGB", (8, 8)).tobytes()[:10])
    data = build_loader(tiny_config(root), rank=0, world_size=1, pin_memory=False)
    data.train_sampler.set_epoch(0)
    with caplog.at_level(logging.WARNING):
        batches = list(data.train_loader)
    assert sum(skipped for _, _, skipped in batches) == 2
    assert all(images.shape == (4, 3, TINY_SIZE, TINY_SIZE) for images, _, _ in batches)  # batches stay full
    assert "1.png" in caplog.text and "2.png" in caplog.text


def test_consecutive_unreadable_training_images_are_counted_once_each(tmp_path, caplog):
    """The first bad file's replacement passes over the second, which its own draw counts (not both draws)."""
    root = make_image_folder(tmp_path, classes=2, train_per_class=4, val_per_class=1)
    for name in ("1.png", "2.png"):  # indices 1 and 2: neighbours in index order
        (root / "train" / "class0" / name).write_bytes(b"not a png")
    data = build_loader(tiny_config(root), rank=0, world_size=1, pin_memory=False)
    assert [data.train_set[index][2] for index in range(4)] == [0, 1, 1, 0]
    assert torch.equal(data.train_set[(1, 7)][0], data.train_set[(3, 7)][0])  # both take the next readable one
    caplog.clear()
    data.train_sampler.set_epoch(0)
    with caplog.at_level(logging.WARNING):
        batches = list(data.train_loader)
    assert sum(skipped for _, _, skipped in batches) == 2
    warned = [record.getMessage() for record in caplog.records if "unreadable" in record.getMessage()]
    assert len(warned) == 2 and any("1.png" in m for m in warned) and any("2.png" in m for m in warned)


def test_unreadable_validation_images_are_left_out_not_replaced(tmp_path, caplog):
    """Replacing them (as in training) would score a neighbour twice; an all-unreadable batch yields no images."""
    root = make_image_folder(tmp_path, classes=2, train_per_class=4, val_per_class=4)
    for name in ("0.png", "1.png", "2.png", "3.png"):  # every image of class0 in val: the whole first batch of 4
        (root / "val" / "class0" / name).write_bytes(b"not a png")
    (root / "val" / "class1" / "2.png").write_bytes(b"not a png")
    data = build_loader(tiny_config(root), rank=0, world_size=1, pin_memory=False)
    with caplog.at_level(logging.WARNING):
        batches = list(data.val_loader)
    assert [(None if images is None else images.shape[0], skipped) for images, _, skipped in batches] == [
        (None, 4), (3, 1)]
    assert batches[1][1].tolist() == [1, 1, 1]
    assert "leaving out unreadable image" in caplog.text


def test_rank_batches_union_to_single_process_batches():
    size, batch, world = 24, 4, 2
    single = ResumableDistributedSampler(size, 1, 0, seed=5)
    ranks = [ResumableDistributedSampler(size, world, r, seed=5) for r in range(world)]
    for sampler in (single, *ranks):
        sampler.set_epoch(3)
    single_keys = list(single)
    rank_keys = [list(s) for s in ranks]
    for i in range(size // (batch * world)):
        union = set(rank_keys[0][i * batch:(i + 1) * batch]) | set(rank_keys[1][i * batch:(i + 1) * batch])
        assert union == set(single_keys[i * batch * world:(i + 1) * batch * world])
    assert sorted(k[0] for k in single_keys) == list(range(size))
    other_epoch = ResumableDistributedSampler(size, 1, 0, seed=5)
    other_epoch.set_epoch(4)
    assert [k[0] for k in other_epoch] != [k[0] for k in single_keys]


def test_sampler_resume_skips_exactly_and_pads():
    sampler = ResumableDistributedSampler(10, 3, 1, seed=0)
    sampler.set_epoch(2)
    full = list(sampler)
    assert len(full) == len(sampler) == 4  # ceil(10 / 3), padded
    sampler.set_epoch(2, start=3)
    assert list(sampler) == full[3:] and len(sampler) == 1
    shards = [list(ShardSampler(10, 3, r)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(10))  # evaluation: every image exactly once


def test_each_epoch_draws_new_augmentations():
    """A sample's key carries the seed of its epoch: the same image is augmented differently every epoch."""
    sampler = ResumableDistributedSampler(6, 2, 1, seed=5)
    keys = {}
    for epoch in (3, 4):
        sampler.set_epoch(epoch)
        keys[epoch] = dict(sampler)
        assert all(seed == sample_seed(5, epoch, index) for index, seed in keys[epoch].items())
    shared = keys[3].keys() & keys[4].keys()
    assert all(keys[3][index] != keys[4][index] for index in shared)


def test_padding_a_dataset_smaller_than_the_process_count_gives_every_rank_one_sample():
    ranks = [list(ResumableDistributedSampler(2, 5, rank, seed=0, shuffle=False)) for rank in range(5)]
    assert [[index for index, _ in keys] for keys in ranks] == [[0], [1], [0], [1], [0]]


def test_transforms_and_mixup_follow_the_config(tmp_path):
    """Values other than timm's defaults reach the built objects."""
    config = tiny_config(tmp_path, "AUG.HFLIP", "0.25", "DATA.INTERPOLATION", "bicubic", "DATA.CROP_PCT", "0.5",
                         "AUG.MIXUP", "0.3", "AUG.CUTMIX", "0.6", "AUG.MIXUP_PROB", "0.7",
                         "AUG.MIXUP_SWITCH_PROB", "0.2", "MODEL.LABEL_SMOOTHING", "0.05")
    train = build_transform(config, is_train=True).transforms
    crop = next(t for t in train if type(t).__name__ == "RandomResizedCropAndInterpolation")
    assert crop.interpolation == InterpolationMode.BICUBIC
    assert next(t for t in train if isinstance(t, transforms.RandomHorizontalFlip)).p == 0.25
    resize = next(t for t in build_transform(config, is_train=False).transforms if isinstance(t, transforms.Resize))
    assert resize.size == int(TINY_SIZE / 0.5) and resize.interpolation == InterpolationMode.BICUBIC
    mixup = build_mixup(config)
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.mix_prob, mixup.switch_prob, mixup.label_smoothing,
            mixup.num_classes) == (0.3, 0.6, 0.7, 0.2, 0.05, 2)


@pytest.mark.parametrize("mixup, cutmix", [(0.8, 0.0), (0.0, 1.0)])
def test_mixup_alone_or_cutmix_alone_is_still_applied(mixup, cutmix):
    assert build_mixup(tiny_config("")) is None  # both off: no Mixup object
    mix = build_mixup(tiny_config("", "AUG.MIXUP", str(mixup), "AUG.CUTMIX", str(cutmix)))
    assert mix is not None and (mix.mixup_alpha, mix.cutmix_alpha) == (mixup, cutmix)


def test_the_training_crop_scale_and_erasing_count_follow_the_config():
    config = tiny_config("", "AUG.SCALE", "[0.5, 0.9]", "AUG.RECOUNT", "3")
    steps = build_transform(config, is_train=True).transforms
    crop = next(t for t in steps if type(t).__name__ == "RandomResizedCropAndInterpolation")
    assert tuple(crop.scale) == (0.5, 0.9)
    erasing = next(t for t in steps if isinstance(t, RandomErasing))
    assert erasing.max_count == 3


def test_the_validation_loader_keeps_the_last_partial_batch():
    images = [(torch.full((3, 2, 2), float(i)), i % 2, 0) for i in range(5)]
    loader = _val_loader(tiny_config("", "DATA.BATCH_SIZE", "2"), images, rank=0, world_size=1, pin_memory=False)
    seen = torch.cat([batch[0][:, 0, 0, 0] for batch in loader])
    assert seen.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]  # every image scored once, the fifth in a batch of one


def test_augmentation_depends_only_on_the_sample_key(tmp_path):
    root = make_image_folder(tmp_path, classes=2, train_per_class=2, val_per_class=1)
    train_set, _ = build_datasets(tiny_config(root, "AUG.REPROB", "0.5", "AUG.SCALE", "[0.2, 1.0]"))
    torch.manual_seed(0)
    first = train_set[(1, 1234)][0]
    state = torch.get_rng_state()
    torch.rand(7)  # the global generators move on; the sample must not change
    again = train_set[(1, 1234)][0]
    assert torch.equal(first, again)
    assert not torch.equal(first, train_set[(1, 999)][0])
    torch.set_rng_state(state)
    train_set[(0, 1)]
    assert torch.equal(torch.get_rng_state(), state)  # loading in the main process leaves its generators alone


def test_digits_builder_is_complete_and_idempotent(tmp_path):
    manifest = build_digits(tmp_path, image_size=8)
    assert manifest["train"] + manifest["val"] == 1797 and manifest["val"] == 360
    classes = sorted(p.name for p in (tmp_path / "train").iterdir())
    assert classes == [str(d) for d in range(10)]
    assert sorted(p.name for p in (tmp_path / "val").iterdir()) == classes
    image = Image.open(next((tmp_path / "val" / "3").iterdir()))
    assert image.size == (8, 8) and image.mode == "RGB"
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "train" / "0").iterdir()}
    assert build_digits(tmp_path, image_size=8) == manifest
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "train" / "0").iterdir()} == stamp


@pytest.mark.parametrize("damage", ["truncate", "flip_a_byte", "delete", "old_manifest"])
def test_digits_builder_rebuilds_a_damaged_dataset(tmp_path, caplog, damage):
    """Counts alone miss a truncated or corrupted file; the manifest's SHA-256 of every file catches it."""
    manifest = build_digits(tmp_path, image_size=8)
    victim = tmp_path / "train" / "3" / next(iter(sorted(p.name for p in (tmp_path / "train" / "3").iterdir())))
    original = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(original[:len(original) // 2])
    elif damage == "flip_a_byte":
        victim.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    elif damage == "delete":
        victim.unlink()
    else:  # a manifest from before the hashes: counts only
        (tmp_path / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "files"}))
    with caplog.at_level(logging.INFO):
        assert build_digits(tmp_path, image_size=8) == manifest
    assert victim.read_bytes() == original
    assert "already complete" not in caplog.text and "wrote the digits dataset" in caplog.text
    if damage != "old_manifest":
        assert f"1 of 1797 files missing or corrupt (train/3/{victim.name}): rebuilding" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        build_digits(tmp_path, image_size=8)
    assert "already complete" in caplog.text


def test_digits_images_and_split_are_sklearns_digits(tmp_path, caplog):
    """At image_size 8 (no resampling) each PNG is its bundled digit, 0..16 scaled to 0..255; the split is the
    stratified one the manifest's seed reproduces; another image size rebuilds, bicubically upscaled; a stray PNG is
    loaded with the dataset, and said so."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    manifest = build_digits(tmp_path, image_size=8)
    val = sorted(int(path.stem) for path in (tmp_path / "val").glob("*/*.png"))
    for index in val[:40]:
        pixels = np.asarray(Image.open(tmp_path / "val" / str(digits.target[index]) / f"{index:04d}.png"))
        expected = np.rint(digits.images[index] * (255 / 16))
        assert pixels.shape == (8, 8, 3) and np.array_equal(pixels, np.repeat(expected[..., None], 3, axis=-1))
    counts = np.bincount(digits.target[val], minlength=10)
    assert np.all(np.abs(counts - 0.2 * np.bincount(digits.target)) < 1)  # stratified: 20 % of every class
    _, expected_val = train_test_split(np.arange(len(digits.target)), test_size=0.2,
                                       random_state=manifest["split_seed"], stratify=digits.target)
    assert val == sorted(expected_val.tolist())

    shutil.copy(next((tmp_path / "train" / "3").iterdir()), tmp_path / "train" / "3" / "extra.png")
    with caplog.at_level(logging.INFO):
        build_digits(tmp_path, image_size=8)
    assert "already complete" in caplog.text
    assert "1 PNG files that it does not list will be loaded with it (train/3/extra.png)" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.INFO):
        larger = build_digits(tmp_path, image_size=16)
    assert larger["image_size"] == 16 and "built for another image size" in caplog.text
    pixels = np.asarray(Image.open(tmp_path / "val" / str(digits.target[val[0]]) / f"{val[0]:04d}.png"))[..., 0]
    assert pixels.shape == (16, 16)
    # Nearest-neighbour upscaling would repeat each pixel in a 2 x 2 block and keep the 17 grey levels.
    levels = set(np.rint(np.arange(17) * (255 / 16)).tolist())
    assert not set(np.unique(pixels).tolist()) <= levels


def test_digits_image_size_below_one_is_a_usage_error(tmp_path, monkeypatch, capsys):
    from classification.data import digits

    monkeypatch.setattr(sys, "argv", ["digits", "--root", str(tmp_path / "digits"), "--image-size", "0"])
    with pytest.raises(SystemExit) as raised:
        digits.main()
    assert raised.value.code == 2 and "--image-size must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "digits").exists()


def test_digits_builder_reports_a_root_it_cannot_write(tmp_path, monkeypatch):
    from classification.data import digits

    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(sys, "argv", ["digits", "--root", str(tmp_path / "a_file" / "digits")])
    with pytest.raises(SystemExit, match=r"digits: cannot write the dataset to .*a_file/digits"):
        digits.main()


def test_release_randaugment_survives_its_strongest_posterize(tmp_path):
    """rand-m9-mstd0.5-inc1 draws magnitudes >= 10, where PosterizeIncreasing asks Pillow for 0 bits (Pillow 13
    rejects that; requirements.txt pins a Pillow that takes it). Then the recipe's transform over many images."""
    from timm.data.auto_augment import AugmentOp

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (TINY_SIZE, TINY_SIZE, 3), dtype=np.uint8))
    posterized = np.asarray(AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)(image))
    assert posterized.max() == 0  # 0 bits kept: every channel value becomes 0
    config = get_config(argparse.Namespace(data_path=str(tmp_path), opts=["DATA.IMG_SIZE", str(TINY_SIZE)]),
                        world_size=1)
    assert config.AUG.AUTO_AUGMENT == "rand-m9-mstd0.5-inc1"
    transform = build_transform(config, is_train=True)
    torch.manual_seed(0)
    for _ in range(150):
        assert transform(image).shape == (3, TINY_SIZE, TINY_SIZE)


def test_a_training_folder_without_any_readable_image_is_a_dataset_error(tmp_path):
    root = make_image_folder(tmp_path, classes=2, train_per_class=2, val_per_class=1)
    for path in (root / "train").rglob("*.png"):
        path.write_bytes(b"not a png")
    train_set, _ = build_datasets(tiny_config(root))
    with pytest.raises(DatasetError, match="no readable image in .*train: every file failed"):
        train_set[0]


def _worker_that_outlives_foreign_sigterms() -> None:
    from classification.data import build

    build._exit_on_sigterm_from_parent_only()
    time.sleep(60)


def test_a_loader_worker_ignores_a_foreign_sigterm_and_exits_on_its_parents():
    """A scheduler's SIGTERM to the whole group leaves the workers running (the training process stops after its
    update and ends them); the parent's own SIGTERM (DataLoader shutdown, multiprocessing at exit) ends one quietly."""
    worker = multiprocessing.get_context("fork").Process(target=_worker_that_outlives_foreign_sigterms, daemon=True)
    worker.start()
    try:
        time.sleep(0.5)  # the worker has blocked SIGTERM and waits for it
        subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)  # sent by another process
        worker.join(timeout=1.0)
        assert worker.is_alive()
        worker.terminate()  # SIGTERM from the parent
        worker.join(timeout=10)
        assert worker.exitcode == 0
    finally:
        if worker.is_alive():
            worker.kill()


def test_one_class_fewer_than_the_model_has_outputs_is_named(tmp_path, caplog):
    root = make_image_folder(tmp_path / "data", classes=2, train_per_class=1, val_per_class=1)
    with caplog.at_level(logging.WARNING):
        build_datasets(tiny_config(root, "MODEL.NUM_CLASSES", "3"))
    assert "has 2 classes and MODEL.NUM_CLASSES is 3: the model's other 1 outputs are never a target (set " \
           "MODEL.NUM_CLASSES 2 unless that is meant)" in caplog.text


def test_a_folder_with_only_hidden_folders_has_no_class_folder(tmp_path):
    (tmp_path / "split" / ".ipynb_checkpoints").mkdir(parents=True)
    (tmp_path / "split" / "notes.png").write_bytes(b"")  # a file at the top is no class either
    with pytest.raises(DatasetNotFoundError, match=r"no class folder in"):
        SafeImageFolder(str(tmp_path / "split"), transform=None, replace_unreadable=False)
