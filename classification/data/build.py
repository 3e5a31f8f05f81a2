"""ImageNet-style data: ImageFolder datasets, the release's timm transforms, resumable samplers, Mixup/CutMix.

Every training sample is drawn with a key ``(index, sample_seed)`` where ``sample_seed`` is a function of
(SEED, epoch, index) only. The dataset seeds the python/numpy/torch generators with it before applying the random
transform, so a sample's augmentation depends neither on the worker that loads it nor on the number of processes,
and a run resumed in the middle of an epoch sees exactly the batches the uninterrupted run would have seen.
"""
import dataclasses
import hashlib
import logging
import math
import os
import random
import signal
import threading
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data import Mixup, create_transform
from torch.utils.data import DataLoader, Sampler, default_collate, get_worker_info
from torchvision.datasets import ImageFolder
from yacs.config import CfgNode

from classification.config import NUMPY_SEED_LIMIT
from classification.data.images import IMAGE_ERRORS, load_rgb
from classification.utils.messages import abbreviate

logger = logging.getLogger(__name__)

TRAIN_SPLIT = "train"
VAL_SPLIT = "val"
MAX_LISTED_CLASSES = 5  # class names an error lists

SampleKey = tuple[int, int]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for the augmentation of sample ``index`` in ``epoch``."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class DatasetError(ValueError):
    """A dataset that does not fit the run (classes, batch size); the message says what to change."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A dataset folder that is missing or holds no class folder or image."""


class SafeImageFolder(ImageFolder):
    """ImageFolder whose items are ``(image, target, skipped)``; an unreadable image is logged and skipped.

    Images are opened with :func:`load_rgb` (16-bit and float images are scaled to 8 bits, not clipped).
    ``skipped`` is 1 when the item's own file is unreadable, else 0, so summed over an epoch (where the sampler draws
    every index once) it is the number of unreadable files drawn. With ``replace_unreadable`` (training) the next
    readable image (in index order, wrapping around) takes its place, so batches keep their size (which Mixup and
    DDP need); unreadable neighbours passed over on the way are not counted again (their own draw counts them).
    Without it (evaluation, where a duplicate would be scored twice) the item is ``(None, target, 1)`` and
    :func:`collate_with_skips` leaves it out. Items may be fetched with a plain index or a :data:`SampleKey` (then
    the transform is seeded).
    """

    def __init__(self, root: str, transform: Callable[[Image.Image], torch.Tensor], replace_unreadable: bool):
        try:
            super().__init__(root, transform=transform, loader=load_rgb)
        except FileNotFoundError as err:  # torchvision: a class folder without a file of an image extension
            raise DatasetNotFoundError(f"dataset folder {root}: {err}") from err
        self.replace_unreadable = replace_unreadable

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        """The class folders of ``directory`` in sorted order, without hidden ones (``.ipynb_checkpoints``, say, which
        ImageFolder would take for a class and shift every later label)."""
        classes = class_folder_names(Path(directory))
        if not classes:
            raise FileNotFoundError(f"no class folder in {directory}")
        return classes, {name: label for label, name in enumerate(classes)}

    def __getitem__(self, key: int | SampleKey) -> tuple[torch.Tensor | None, int, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        if not self.replace_unreadable:
            path, target = self.samples[index]
            try:
                image = self.loader(path)
            except IMAGE_ERRORS as err:
                logger.warning("leaving out unreadable image %s (%s: %s)", path, type(err).__name__, err)
                return None, target, 1
            return self._transform(image, seed), target, 0
        for offset in range(len(self.samples)):
            path, target = self.samples[(index + offset) % len(self.samples)]
            try:
                image = self.loader(path)
            except IMAGE_ERRORS as err:
                if offset == 0:
                    logger.warning("skipping unreadable image %s (%s: %s)", path, type(err).__name__, err)
                else:  # a neighbour tried as the replacement: its own draw logs and counts it
                    logger.debug("passing over unreadable image %s as a replacement", path)
                continue
            return self._transform(image, seed), target, int(offset > 0)
        raise DatasetError(f"no readable image in {self.root}: every file failed to open or decode")

    def _transform(self, image: Image.Image, seed: int | None) -> torch.Tensor:
        if self.transform is None:
            raise ValueError("SafeImageFolder needs a transform that returns a tensor")
        if seed is None:
            return self.transform(image)
        in_main_process = get_worker_info() is None
        if in_main_process:  # leave the training process's generators as they were
            saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(seed)
        np.random.seed(seed % NUMPY_SEED_LIMIT)
        torch.manual_seed(seed)
        try:
            return self.transform(image)
        finally:
            if in_main_process:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])


def collate_with_skips(
    batch: list[tuple[torch.Tensor | None, int, int]],
) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    """Stacks ``(image, target, skipped)`` items into images, targets and the number of items whose own file was
    unreadable; items without an image are left out (images and targets are None when no item has one)."""
    readable = [(image, target) for image, target, _ in batch if image is not None]
    images, targets = default_collate(readable) if readable else (None, None)
    return images, targets, sum(skipped for _, _, skipped in batch)


class ResumableDistributedSampler(Sampler):
    """Shards a per-epoch permutation over processes (like DistributedSampler) and can start mid-epoch.

    Yields :data:`SampleKey` items. The permutation depends on (seed, epoch) only; the total is padded to a multiple
    of ``num_replicas`` by repeating the first indices. Rank r takes positions r, r + R, r + 2R, ... so that the
    union of the ranks' i-th batches is the i-th batch of a single process with R times the batch size.
    """

    def __init__(self, dataset_size: int, num_replicas: int, rank: int, seed: int, shuffle: bool = True):
        super().__init__()
        self.dataset_size = dataset_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.num_samples = math.ceil(dataset_size / num_replicas)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Selects the epoch's permutation and skips this rank's first ``start`` samples of it."""
        self.epoch = epoch
        self.start = start

    def __iter__(self) -> Iterator[SampleKey]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_size, generator=generator).tolist()
        else:
            order = list(range(self.dataset_size))
        padding = self.num_samples * self.num_replicas - self.dataset_size
        order += (order * math.ceil(padding / self.dataset_size))[:padding]
        mine = order[self.rank::self.num_replicas][self.start:]
        return iter([(index, sample_seed(self.seed, self.epoch, index)) for index in mine])

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardSampler(Sampler):
    """Evaluation sampler: rank r takes indices r, r + R, ... with no padding, so every image counts once."""

    def __init__(self, dataset_size: int, num_replicas: int, rank: int):
        super().__init__()
        self.indices = list(range(rank, dataset_size, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclasses.dataclass
class Data:
    """Everything the training loop needs from the data side."""

    train_set: SafeImageFolder
    val_set: SafeImageFolder
    train_sampler: ResumableDistributedSampler
    train_loader: DataLoader
    val_loader: DataLoader
    mixup_fn: Mixup | None


def dataset_root(config: CfgNode) -> Path:
    """DATA.DATA_PATH; a DatasetNotFoundError saying what to give when it is not set."""
    if not config.DATA.DATA_PATH:
        raise DatasetNotFoundError(f"no dataset given: set --data-path DIR (DATA.DATA_PATH), an ImageFolder root "
                                   f"holding {TRAIN_SPLIT}/ and {VAL_SPLIT}/")
    return Path(config.DATA.DATA_PATH)


def class_folder_names(root: Path) -> list[str]:
    """The sorted names of the class folders in ``root``: its sub-folders but hidden ones (a name starting with a
    dot)."""
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))


def check_image_folder(root: Path) -> None:
    """Raises DatasetNotFoundError with a clear message when ``root`` is missing, has no class folder or no image."""
    if not root.is_dir():
        raise DatasetNotFoundError(f"dataset folder {root} does not exist")
    classes = [root / name for name in class_folder_names(root)]
    if not classes:
        raise DatasetNotFoundError(f"dataset folder {root} is empty: it needs one sub-folder of images per class")
    if not any(f.is_file() for d in classes for f in d.iterdir()):
        raise DatasetNotFoundError(f"dataset folder {root} holds class folders but no image files")


def build_transform(config: CfgNode, is_train: bool) -> Callable:
    """The release's timm transforms: RandAugment/random erasing for training, resize + centre crop for eval."""
    if is_train:
        return create_transform(
            input_size=config.DATA.IMG_SIZE, is_training=True, scale=tuple(config.AUG.SCALE),
            hflip=config.AUG.HFLIP, color_jitter=config.AUG.COLOR_JITTER,
            auto_augment=config.AUG.AUTO_AUGMENT or None, interpolation=config.DATA.INTERPOLATION,
            re_prob=config.AUG.REPROB, re_mode=config.AUG.REMODE, re_count=config.AUG.RECOUNT,
        )
    return create_transform(input_size=config.DATA.IMG_SIZE, is_training=False,
                            interpolation=config.DATA.INTERPOLATION, crop_pct=config.DATA.CROP_PCT)


def build_datasets(config: CfgNode) -> tuple[SafeImageFolder, SafeImageFolder]:
    """Train and val ImageFolders under DATA.DATA_PATH, checked for presence and matching classes."""
    root = dataset_root(config)
    for split in (TRAIN_SPLIT, VAL_SPLIT):
        check_image_folder(root / split)
    train_set = SafeImageFolder(str(root / TRAIN_SPLIT), build_transform(config, is_train=True),
                                replace_unreadable=True)
    val_set = SafeImageFolder(str(root / VAL_SPLIT), build_transform(config, is_train=False), replace_unreadable=False)
    if train_set.classes != val_set.classes:
        only_train = sorted(set(train_set.classes) - set(val_set.classes))
        only_val = sorted(set(val_set.classes) - set(train_set.classes))
        raise DatasetError(f"train/val class mismatch under {root}: only in train {only_train}, only in val {only_val}")
    if len(train_set.classes) > config.MODEL.NUM_CLASSES:
        raise DatasetError(f"{root} has {len(train_set.classes)} classes but MODEL.NUM_CLASSES is "
                           f"{config.MODEL.NUM_CLASSES}")
    if len(train_set.classes) < config.MODEL.NUM_CLASSES:
        logger.warning("%s has %d classes and MODEL.NUM_CLASSES is %d: the model's other %d outputs are never a "
                       "target (set MODEL.NUM_CLASSES %d unless that is meant)", root, len(train_set.classes),
                       config.MODEL.NUM_CLASSES, config.MODEL.NUM_CLASSES - len(train_set.classes),
                       len(train_set.classes))
    return train_set, val_set


def _init_worker(worker_id: int) -> None:
    """Seeds python and numpy in a loader worker from its torch seed (torch seeds itself per worker), and makes it
    outlive a SIGTERM from anyone but its parent (:func:`_exit_on_sigterm_from_parent_only`)."""
    worker_seed = torch.initial_seed() % NUMPY_SEED_LIMIT
    random.seed(worker_seed)
    np.random.seed(worker_seed)
    _exit_on_sigterm_from_parent_only()


def _exit_on_sigterm_from_parent_only() -> None:
    """In a loader worker: a SIGTERM from the parent (shutting its workers down) ends it quietly, as torch's own
    handler does; one from anyone else is ignored. A scheduler or torchrun signals the whole process group, and a
    worker ended by that would crash the training process, which on SIGTERM first finishes its update and saves
    (:class:`main.StopRequest`), then ends its workers itself. A worker whose parent died exits by torch's watchdog.
    Where the sender cannot be told (no ``sigwaitinfo``: macOS, Windows), torch's handling stays."""
    if not hasattr(signal, "sigwaitinfo"):
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from here on inherit the mask

    def wait_for_sigterm() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)

    threading.Thread(target=wait_for_sigterm, name="sigterm-from-parent", daemon=True).start()


def build_mixup(config: CfgNode) -> Mixup | None:
    """timm Mixup/CutMix with label smoothing, or None when both alphas are 0."""
    if config.AUG.MIXUP <= 0 and config.AUG.CUTMIX <= 0:
        return None
    return Mixup(mixup_alpha=config.AUG.MIXUP, cutmix_alpha=config.AUG.CUTMIX, prob=config.AUG.MIXUP_PROB,
                 switch_prob=config.AUG.MIXUP_SWITCH_PROB, mode=config.AUG.MIXUP_MODE,
                 label_smoothing=config.MODEL.LABEL_SMOOTHING, num_classes=config.MODEL.NUM_CLASSES)


def _loader_options(config: CfgNode, pin_memory: bool) -> dict:
    return dict(num_workers=config.DATA.NUM_WORKERS, pin_memory=pin_memory and config.DATA.PIN_MEMORY,
                collate_fn=collate_with_skips, worker_init_fn=_init_worker,
                generator=torch.Generator().manual_seed(config.SEED))


def _val_loader(config: CfgNode, val_set: SafeImageFolder, rank: int, world_size: int, pin_memory: bool) -> DataLoader:
    return DataLoader(val_set, sampler=ShardSampler(len(val_set), world_size, rank),
                      batch_size=config.DATA.BATCH_SIZE, drop_last=False, **_loader_options(config, pin_memory))


def build_loader(config: CfgNode, rank: int, world_size: int, pin_memory: bool) -> Data:
    """Datasets, samplers and loaders for this process, plus the Mixup function.

    Args:
        config: Run configuration (DATA.*, AUG.*, MODEL.NUM_CLASSES, MODEL.LABEL_SMOOTHING, SEED).
        rank: Global rank of this process.
        world_size: Number of processes.
        pin_memory: Pin batches in host memory (set when training on CUDA).
    """
    train_set, val_set = build_datasets(config)
    train_sampler = ResumableDistributedSampler(len(train_set), world_size, rank, seed=config.SEED)
    train_loader = DataLoader(train_set, sampler=train_sampler, batch_size=config.DATA.BATCH_SIZE, drop_last=True,
                              **_loader_options(config, pin_memory))
    if len(train_loader) == 0:
        raise DatasetError(f"{len(train_set)} training images give no full batch of {config.DATA.BATCH_SIZE} "
                           f"per process over {world_size} process(es): give a smaller --batch-size "
                           "(DATA.BATCH_SIZE), fewer processes or more images")
    return Data(train_set=train_set, val_set=val_set, train_sampler=train_sampler, train_loader=train_loader,
                val_loader=_val_loader(config, val_set, rank, world_size, pin_memory), mixup_fn=build_mixup(config))


def label_by_trained_classes(val_set: SafeImageFolder, trained_classes: Sequence[str] | None, num_classes: int) -> None:
    """Gives the val images the labels the weights were trained with, in place.

    ImageFolder numbers the class folders it finds in sorted order, so a val/ without some class (or with other
    classes) would shift every later label. With the class list our checkpoints carry, each folder gets its trained
    index (val/ may hold a subset). Without one (released weights, our checkpoints before they carried the list), the
    sorted folder names are the labels: more folders than ``num_classes`` is an error, fewer a warning (right only
    when the weights were trained on exactly these classes).

    Raises:
        DatasetError: val/ holds a class the weights were not trained on, or (without a class list) more classes than
            the model's outputs; the message says which.
    """
    root = val_set.root
    if trained_classes is None:
        if len(val_set.classes) > num_classes:
            raise DatasetError(f"{root} holds {len(val_set.classes)} class folders, more than the model's "
                               f"{num_classes} outputs")
        if len(val_set.classes) < num_classes:
            logger.warning("%s holds %d class folders and the model has %d outputs; these weights carry no class "
                           "list, so the sorted folder names are the labels: right only if the weights were trained "
                           "on exactly these classes (a missing class shifts the labels after it)", root,
                           len(val_set.classes), num_classes)
        return
    index = {name: label for label, name in enumerate(trained_classes)}
    unknown = [name for name in val_set.classes if name not in index]
    if unknown:
        listed = abbreviate(unknown, MAX_LISTED_CLASSES)
        raise DatasetError(f"{root} holds classes the weights were not trained on: {listed} ({len(unknown)} of "
                           f"{len(val_set.classes)}; they were trained on {len(trained_classes)} classes)")
    if val_set.classes != list(trained_classes):
        logger.info("%s holds %d of the %d classes the weights were trained on: labelled by the trained class list",
                    root, len(val_set.classes), len(trained_classes))
    relabel = [index[name] for name in val_set.classes]
    val_set.samples = [(path, relabel[target]) for path, target in val_set.samples]
    val_set.targets = [target for _, target in val_set.samples]
    val_set.class_to_idx = {name: index[name] for name in val_set.classes}


def build_eval_loader(config: CfgNode, rank: int, world_size: int, pin_memory: bool,
                      trained_classes: Sequence[str] | None) -> DataLoader:
    """The validation loader alone (``--eval`` needs no train/ folder), labelled by ``trained_classes`` (the class
    list of the weights' checkpoint, None when it has none; see :func:`label_by_trained_classes`)."""
    root = dataset_root(config) / VAL_SPLIT
    check_image_folder(root)
    val_set = SafeImageFolder(str(root), build_transform(config, is_train=False), replace_unreadable=False)
    label_by_trained_classes(val_set, trained_classes, config.MODEL.NUM_CLASSES)
    return _val_loader(config, val_set, rank, world_size, pin_memory)
