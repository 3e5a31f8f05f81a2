"""A training run's output folder: the training checkpoints the epoch loop writes, the choice of the one to resume
from and its restoring, the ``log.txt`` records and their TensorBoard mirror, and the end-of-epoch outputs.

At the end of an epoch ``checkpoint_latest.pth`` is written first and carries the epoch's outputs (its ``log.txt``
record and whether it was the best); :func:`finish_epoch` then writes the best and numbered checkpoints,
``model_ema.pth``, the record and its scalars. A run resumed from such a checkpoint of its own folder completes what a
crash cut short; a run that starts before what its folder holds first moves the later files aside
(:func:`set_aside_later_outputs`), so that nothing of an abandoned pass is resumed or taken for the new one. While a
run trains, its rank 0 holds the folder's lock (:func:`run_folder_lock`): a second run there is refused.
"""
import collections
import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import shutil
import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, NamedTuple

import torch
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3
from torch import nn
from yacs.config import CfgNode

from classification.config import MODEL_SECTIONS, SCALED_LR_KEYS, ConfigError, mesa_start_epoch
from classification.data.build import MAX_LISTED_CLASSES
from classification.engine import updates_before
from classification.models import CheckpointError, has_ema_weights, load_checkpoint, with_variant_values
from classification.utils import checkpoint as ckpt
from classification.utils.distributed import DistributedContext, all_gather_objects, broadcast_object, on_main_rank
from classification.utils.messages import abbreviate

try:
    import fcntl
except ImportError:  # Windows: lock_run_folder takes no lock
    fcntl = None

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter  # imported when training starts (slow)

logger = logging.getLogger(__name__)

JSON_LOG_NAME = "log.txt"
ABANDONED_DIR = "abandoned"  # where a run that goes back moves the later checkpoints and log records
TENSORBOARD_DIR = "tensorboard"
EPOCH_OUTPUTS_KEY = "epoch_outputs"  # of an end-of-epoch checkpoint: {"record": log.txt line, "is_best": bool}
CLASSES_KEY = "classes"  # of our checkpoints: the training set's class names in label order
TRAIN_IMAGES_KEY = "train_images"  # of our training checkpoints: how many images the training set holds
LOCK_NAME = ".lock"  # held by the process that trains in the folder (lock_run_folder)
LOCK_HELD_ERRNOS = (errno.EACCES, errno.EAGAIN)  # what lockf raises when another process holds the lock
# What lockf raises on a file system without locks (NFS without lockd, Lustre mounted without locking, ...).
LOCKS_UNSUPPORTED_ERRNOS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)
# Keys that say where and how a run is executed, not what it trains: differences in them are not reported on resume.
RUN_LOCATION_KEYS = frozenset({"OUTPUT", "TAG", "MODEL.RESUME", "TRAIN.AUTO_RESUME", "EVAL_MODE", "THROUGHPUT_MODE",
                               "PRINT_FREQ", "DATA.NUM_WORKERS", "DATA.PIN_MEMORY"})


# MODEL.<FAMILY> keys that regularise training without changing the model's design: they may change on resume.
REGULARISATION_KEYS = frozenset({"DROP_RATE", "DROP_PATH_RATE"})


class RunFolderBusyError(RuntimeError):
    """Another process holds the lock of the run's folder (it trains there); the message names it."""


def lock_run_folder(output_dir: Path) -> BinaryIO | None:
    """Takes the exclusive lock of a training run's folder (a POSIX ``lockf`` lock on :data:`LOCK_NAME`) and returns
    the open file that holds it; the lock lasts until the file is closed or the process ends, however it ends (or the
    process closes any other descriptor of the file: POSIX locks are the process's, so nothing else opens it). Two
    runs writing one folder would overwrite each other's checkpoints: a requeued job whose predecessor still runs
    (say, workers orphaned by a killed torchrun). A POSIX lock belongs to the process alone: data-loader workers
    forked later do not hold it after their parent died (a ``flock`` lock would be theirs too). None where ``fcntl``
    does not exist (Windows): no lock there.

    Raises:
        RunFolderBusyError: Another process holds the lock.
    """
    if fcntl is None:
        return None
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = open(output_dir / LOCK_NAME, "a+b")
    try:
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in LOCK_HELD_ERRNOS:
            lock.seek(0)
            holder = lock.read().decode(errors="replace").strip() or "another process"
            lock.close()
            raise RunFolderBusyError(f"{output_dir} is in use by another training run ({holder}): wait for it to end "
                                     "or stop it, or give this run another --tag") from err
        lock.close()
        if err.errno not in LOCKS_UNSUPPORTED_ERRNOS:
            raise
        logger.warning("%s: the file system takes no locks (%s): training without one, so nothing stops a second run "
                       "in this folder", output_dir, err.strerror or err)
        return None
    lock.truncate(0)
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}".encode())
    lock.flush()
    return lock


@contextlib.contextmanager
def run_folder_lock(output_dir: Path, ctx: DistributedContext) -> Iterator[None]:
    """Rank 0 holds :func:`lock_run_folder` for the block; every rank raises its error when the folder is busy."""
    lock, busy = None, None
    if ctx.is_main:
        try:
            lock = lock_run_folder(output_dir)
        except RunFolderBusyError as err:
            busy = str(err)
        except OSError as err:  # every rank must hear of it: the others wait in the broadcast
            busy = (f"cannot lock {output_dir / LOCK_NAME} ({type(err).__name__}: {err.strerror or err}): give "
                    "another --output or --tag")
    busy = broadcast_object(busy)
    if busy:
        raise RunFolderBusyError(busy)
    try:
        yield
    finally:
        if lock is not None:
            lock.close()


@dataclasses.dataclass(frozen=True)
class TrainingState:
    """What the training checkpoints save besides the position: the objects being trained and what describes them."""

    model: nn.Module  # without its DDP wrapper
    model_ema: ModelEmaV3 | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    config: CfgNode
    classes: list[str]  # the training set's class names in label order (--eval labels val/ by them)
    train_images: int  # how many images train/ holds (a mid-epoch position is only valid on as many)


class Position(NamedTuple):
    """Where training continues from a checkpoint, and the best accuracies reached before it."""

    epoch: int
    step: int  # steps done in ``epoch`` (0: at its start)
    num_updates: int
    max_accuracy: float
    max_accuracy_ema: float


def save_training_checkpoint(path: Path, state: TrainingState, position: Position, is_main: bool,
                             epoch_outputs: dict | None = None) -> None:
    """Collective: gathers every rank's RNG state, then rank 0 writes the checkpoint atomically.

    The learning-rate schedule is not saved: it is a function of the config and ``position.num_updates``.
    ``epoch_outputs`` (end-of-epoch checkpoints): what :func:`finish_epoch` writes from, so that a resumed run can
    complete it.
    """
    rng_states = all_gather_objects(ckpt.capture_rng_state())

    def write() -> None:
        ema = state.model_ema.module.state_dict() if state.model_ema else None
        ckpt.atomic_save({
            "model": state.model.state_dict(), "model_ema": ema, "optimizer": state.optimizer.state_dict(),
            "scaler": state.scaler.state_dict(), **position._asdict(), "rng_states": rng_states,
            "config": state.config.dump(), CLASSES_KEY: state.classes, TRAIN_IMAGES_KEY: state.train_images,
            EPOCH_OUTPUTS_KEY: epoch_outputs,
        }, path)
        logger.info("saved %s (epoch %d, step %d)", path, position.epoch, position.step)

    on_main_rank(is_main, write)


def trained_classes(checkpoint: object) -> list[str] | None:
    """The training class names, in label order, that a checkpoint of ours carries (:data:`CLASSES_KEY`); None for
    a file without them (released weights, a bare state dict)."""
    classes = checkpoint.get(CLASSES_KEY) if isinstance(checkpoint, Mapping) else None
    if isinstance(classes, list) and all(isinstance(name, str) for name in classes):
        return classes
    return None


def newest_checkpoint(output_dir: Path, ctx: DistributedContext) -> tuple[str, tuple[int, int]] | None:
    """Rank 0's pick of the newest valid checkpoint in ``output_dir`` and its (epoch, step) position, or None; the
    same on every rank."""
    found = on_main_rank(ctx.is_main, lambda: ckpt.find_resume_checkpoint(output_dir), share_result=True)
    return (str(found[0]), found[1]) if found else None


def in_run_folder(path: str | Path, output_dir: Path) -> bool:
    """Whether the file ``path`` lies in the run's folder (by its folder: a link to a file elsewhere is inside)."""
    return Path(path).absolute().parent.resolve() == output_dir.resolve()


def choose_resume_checkpoint(config: CfgNode, ctx: DistributedContext, output_dir: Path) -> tuple[str, bool]:
    """The checkpoint training resumes from ('' for a fresh start), and whether it is the run's own newest checkpoint,
    whose records :func:`newest_checkpoint` has just checked.

    Without MODEL.RESUME: the run's newest valid checkpoint (TRAIN.AUTO_RESUME). With a MODEL.RESUME outside the
    run's output directory, the run's own newest checkpoint wins when it is at least as far along: re-running the same
    command after a crash continues the run instead of going back. A MODEL.RESUME inside the run's directory is taken
    as given (going back on purpose).
    """
    newest = newest_checkpoint(output_dir, ctx) if config.TRAIN.AUTO_RESUME else None
    given = config.MODEL.RESUME
    given_inside = bool(given) and in_run_folder(given, output_dir)
    if not config.TRAIN.AUTO_RESUME and not given_inside:
        earlier = on_main_rank(ctx.is_main, lambda: sorted(path.name for path in output_dir.glob(ckpt.CHECKPOINT_GLOB)),
                               share_result=True)
        if earlier:
            raise ConfigError(f"TRAIN.AUTO_RESUME is False, but {output_dir} holds the checkpoints of an earlier run "
                              f"({', '.join(earlier)}), which this run would overwrite and mix with its own: give "
                              "another --tag, or continue that run (TRAIN.AUTO_RESUME True, or --resume one of its "
                              "checkpoints)")
    if given and (newest is None or given_inside):
        return given, False
    if newest is None:
        return "", False
    own, own_position = newest
    if not given:
        return own, True
    try:
        given_position = ckpt.checkpoint_position(given)
    except ckpt.TrainingCheckpointError as err:  # e.g. deleted since the run started from it
        logger.warning("MODEL.RESUME: %s; resuming from this run's own %s", err, own)
        return own, True
    if own_position < given_position:
        return given, False
    logger.warning("MODEL.RESUME %s (epoch %d step %d) is outside this run's output directory, which holds the run's "
                   "own progress: resuming from %s (epoch %d step %d); use another --tag to start again from %s",
                   given, *given_position, own, *own_position, given)
    return own, True


def load_weights(model: nn.Module, checkpoint: dict, path: str, use_ema: bool = False) -> None:
    """``load_checkpoint`` of an already read checkpoint, with errors that name its file."""
    try:
        load_checkpoint(model, checkpoint, use_ema=use_ema)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from err


def _flat_items(node: CfgNode, prefix: str = "") -> dict[str, object]:
    """Dotted key -> value, sequences as tuples (yaml text turns tuples into lists)."""
    items = {}
    for key, value in node.items():
        if isinstance(value, CfgNode):
            items.update(_flat_items(value, f"{prefix}{key}."))
        else:
            items[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return items


def saved_config(checkpoint: dict) -> CfgNode:
    """The config of the run that wrote a training checkpoint (stored as yaml text)."""
    return CfgNode.load_cfg(checkpoint["config"])


def config_differences(saved: CfgNode, config: CfgNode, notes: Mapping[str, str] | None = None) -> list[str]:
    """``KEY saved -> current`` for each config key whose value differs from the checkpoint run's config ``saved``,
    leaving out :data:`RUN_LOCATION_KEYS`; keys only one side has are shown with ``(absent)``, and a key of ``notes``
    is followed by its note in parentheses."""
    saved, current, notes = _flat_items(saved), _flat_items(config), notes or {}
    absent = "(absent)"
    keys = sorted((saved.keys() | current.keys()) - RUN_LOCATION_KEYS)
    return [f"{key} {saved.get(key, absent)} -> {current.get(key, absent)}"
            + (f" ({notes[key]})" if key in notes else "")
            for key in keys if saved.get(key, absent) != current.get(key, absent)]


def check_mid_epoch_position(checkpoint: dict, saved: CfgNode, path: str | os.PathLike, config: CfgNode,
                             world_size: int, train_images: int) -> None:
    """A checkpoint saved in the middle of an epoch records its position as a step count into the epoch's order of
    the training images: resuming it is only exact with the batch size, gradient accumulation, process count and
    number of training images (``train_images``) it was saved with (``saved`` is its run's config).

    Raises:
        TrainingCheckpointError: The position cannot be carried over; the message says what to change.
    """
    if checkpoint["step"] == 0:
        return
    names = ("DATA.BATCH_SIZE", "TRAIN.ACCUMULATION_STEPS", "process count", "training images")
    saved_layout = (saved.DATA.BATCH_SIZE, saved.TRAIN.ACCUMULATION_STEPS, len(checkpoint.get("rng_states") or []),
                    checkpoint.get(TRAIN_IMAGES_KEY, train_images))  # a checkpoint without the count: not checked
    layout = (config.DATA.BATCH_SIZE, config.TRAIN.ACCUMULATION_STEPS, world_size, train_images)
    if layout != saved_layout:
        changed = ", ".join(f"{name} {was} -> {now}" for name, was, now in zip(names, saved_layout, layout)
                            if was != now)
        raise ckpt.TrainingCheckpointError(
            f"checkpoint {path} was saved in the middle of epoch {checkpoint['epoch']} (after {checkpoint['step']} "
            f"steps), and this run differs in what that position depends on ({changed}), so its place in the epoch "
            "would be wrong: resume with the saved values (and training images), or from an end-of-epoch checkpoint "
            f"of the run ({ckpt.CHECKPOINT_GLOB.replace('*', 'epochNNNN')} or {ckpt.BEST_NAME}, where it kept one)"
        )


def check_same_design(saved: CfgNode, config: CfgNode, path: str | os.PathLike) -> None:
    """A checkpoint of ours is resumed or evaluated only as the model it was trained as: MODEL.TYPE and the design
    keys of its MODEL.<FAMILY> section (all but :data:`REGULARISATION_KEYS`) must match the checkpoint run's config
    ``saved``.
    Another design of the same shapes (a scan branch or deformable component switched, as the ablations do) would
    load its weights without complaint. The variant's values stand for keys left at None, on both sides (configs
    saved before they were spelled out); a key the checkpoint's config lacks (an older version) is not compared.

    Raises:
        TrainingCheckpointError: A design key differs; the message names each.
    """
    if saved.MODEL.TYPE == config.MODEL.TYPE:
        saved, config = with_variant_values(saved), with_variant_values(config)
    saved_items, items = _flat_items(saved), _flat_items(config)
    section = f"MODEL.{MODEL_SECTIONS.get(config.MODEL.TYPE, '')}."
    design = ["MODEL.TYPE"] + [key for key in items
                               if key.startswith(section) and key.removeprefix(section) not in REGULARISATION_KEYS]
    changed = [f"{key} {saved_items[key]} -> {items[key]}" for key in design
               if key in saved_items and saved_items[key] != items[key]]
    if changed:
        raise ckpt.TrainingCheckpointError(
            f"checkpoint {path} was trained as another model ({'; '.join(changed)}): its weights belong to that "
            "design. Build that one (its run's config.yaml as --cfg), or train this design in its own run folder "
            "(another --tag), from these weights with --pretrained if wanted")


def check_checkpoint_design(checkpoint: object, config: CfgNode, path: str | os.PathLike) -> None:
    """:func:`check_same_design` for a checkpoint that carries its run's config (ours: training checkpoints and
    ``model_ema.pth``); other weights (released ones, bare state dicts) are not checked."""
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("config"), str):
        check_same_design(saved_config(checkpoint), config, path)


def check_same_classes(saved: list[str] | None, classes: list[str], path: str | os.PathLike) -> None:
    """A training checkpoint goes on training only on the class folders it was trained on: the labels are their
    indices in sorted order, so another set of folders (one renamed, added or missing) would silently give the images
    other labels. ``saved`` None (a checkpoint without a class list) is not checked.

    Raises:
        TrainingCheckpointError: The class lists differ; the message says how.
    """
    if saved is None or saved == classes:
        return

    gone, new = [name for name in saved if name not in classes], [name for name in classes if name not in saved]
    how = "; ".join(f"{what}: {abbreviate(names, MAX_LISTED_CLASSES)}"
                    for what, names in (("only in the checkpoint", gone), ("only here", new)) if names)
    how = how or "the same names in another order"
    raise ckpt.TrainingCheckpointError(
        f"checkpoint {path} was trained on other classes than this run's train/ holds ({how}; {len(saved)} classes "
        f"there, {len(classes)} here): resumed, the images would get other labels. Resume on the class folders it was "
        "trained on, or start a new run from its weights with --pretrained and another --tag")


def resume_training(path: str, state: TrainingState, ctx: DistributedContext, lr_scheduler: Scheduler,
                    updates_per_epoch: int, check_crc: bool = True) -> tuple[Position, dict | None]:
    """Restores a training checkpoint into ``state`` and ``lr_scheduler`` (its records checked against their CRC-32
    unless ``check_crc`` is False: the caller has just checked them). Returns the position to continue from, and the
    outputs of the epoch it ends (:func:`finish_epoch`; None for a checkpoint from the middle of an epoch).

    The run continues with the current config, and every key that differs from the checkpoint's run is logged: the
    optimizer keeps its moment estimates but takes the config's hyperparameters (weight decay, betas, eps), and the
    learning-rate schedule is the config's at the update count of the resumed position (epoch x updates per epoch
    + updates done in the epoch, as the training loop counts).
    """
    config, model, model_ema, optimizer = state.config, state.model, state.model_ema, state.optimizer
    checkpoint = ckpt.load_training_checkpoint(path, check_crc)
    saved = saved_config(checkpoint)
    check_same_design(saved, config, path)
    check_same_classes(trained_classes(checkpoint), state.classes, path)  # before: it says more than an image count
    check_mid_epoch_position(checkpoint, saved, path, config, ctx.world_size, state.train_images)
    epoch, step = checkpoint["epoch"], checkpoint["step"]
    num_updates = updates_before(epoch, step, updates_per_epoch, config.TRAIN.ACCUMULATION_STEPS)
    # Both configs hold their learning rates scaled to their own total batch; a derived MESA start is named.
    notes = dict.fromkeys(SCALED_LR_KEYS, "scaled to the total batch")
    if config.TRAIN.MESA.START_EPOCH is None:
        notes["TRAIN.MESA.START_EPOCH"] = f"derived: epoch {mesa_start_epoch(config)}"
    differences = config_differences(saved, config, notes=notes)
    if differences:
        logger.warning("resuming from %s with a config that differs from its run's: %s; this run follows the new "
                       "values (the learning-rate schedule is the new config's, from update %d on)", path,
                       "; ".join(differences), num_updates)
    load_weights(model, checkpoint, path)
    if model_ema is not None:
        if has_ema_weights(checkpoint):
            load_weights(model_ema.module, checkpoint, path, use_ema=True)
        else:
            model_ema.module.load_state_dict(model.state_dict())
            logger.warning("%s holds no EMA weights: the EMA starts from its model weights", path)
    hyperparameters = [{key: value for key, value in group.items() if key != "params"}
                       for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except ValueError as err:  # torch: the saved parameter groups do not match this run's
        raise ckpt.TrainingCheckpointError(
            f"{path}: its optimizer state does not fit this run's parameter groups ({err}); keep the settings that "
            "form the groups (TRAIN.NO_DECAY_SSM, the model) as saved, or start a new run from its weights with "
            "--pretrained and another --tag (this folder resumes its own checkpoints)") from err
    for group, values in zip(optimizer.param_groups, hyperparameters):
        group.update(values)  # the saved state brings back the saved settings: the config's win
    lr_scheduler.step_update(num_updates=num_updates)
    if checkpoint["scaler"] or not state.scaler.is_enabled():
        state.scaler.load_state_dict(checkpoint["scaler"])
    else:  # saved without fp16 (AMP off or bf16), whose scaler holds nothing: fp16 starts with a fresh loss scale
        logger.warning("%s was saved without AMP fp16: the fp16 loss scale starts afresh", path)
    rng_states = checkpoint.get("rng_states") or []
    if len(rng_states) == ctx.world_size:
        ckpt.restore_rng_state(rng_states[ctx.rank])
    else:
        logger.warning("checkpoint has RNG states of %d processes, this run has %d: not restored",
                       len(rng_states), ctx.world_size)
    logger.info("resumed from %s at epoch %d step %d", path, epoch, step)
    position = Position(epoch, step, num_updates, checkpoint.get("max_accuracy", 0.0),
                        checkpoint.get("max_accuracy_ema", 0.0))
    return position, checkpoint.get(EPOCH_OUTPUTS_KEY)


def read_json_log(path: Path) -> tuple[list[dict], int]:
    """The records of a ``log.txt`` (none when it does not exist), and how many of its lines are not records (a line
    cut short by a crash, or edited into something without an integer ``epoch``)."""
    if not path.exists():
        return [], 0
    records, broken = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            records.append(record)
        else:
            broken += 1
    return records, broken


def json_line(record: dict) -> str:
    """One strict JSON line: a NaN or infinite value (a diverged loss) is written as null, which every JSON reader
    takes (``NaN`` is Python's extension)."""
    finite = {key: None if isinstance(value, float) and not math.isfinite(value) else value
              for key, value in record.items()}
    return json.dumps(finite, allow_nan=False) + "\n"


def write_json_record(path: Path, record: dict) -> None:
    """Writes the record of epoch ``record["epoch"]`` into ``log.txt`` after the records of the epochs before it, as
    an atomic rewrite of the file. Records of that epoch and later, from an earlier pass over those epochs (a run that
    went back, a fresh start in the folder), and lines that are not records are dropped (logged)."""
    epoch = record["epoch"]
    records, broken = read_json_log(path)
    kept = [old for old in records if old["epoch"] < epoch]
    if len(kept) < len(records) or broken:
        replaced = sorted({old["epoch"] for old in records if old["epoch"] >= epoch})
        logger.warning("%s: replacing the records of epochs %s and dropping %d lines that are not records (this run "
                       "writes epoch %d again)", path, replaced, broken, epoch)
    ckpt.atomic_write_text("".join(json_line(old) for old in [*kept, record]), path)


def _saved_position(path: Path) -> tuple[int, int] | None:
    """(epoch, step) of the training checkpoint at ``path``; None when it is missing or unreadable."""
    try:
        return ckpt.checkpoint_position(path)
    except ckpt.TrainingCheckpointError:
        return None


def _saved_ema_epoch(path: Path) -> int | None:
    """The epoch count of a ``model_ema.pth``; None when it is missing or unreadable."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"]
    except (*ckpt.LOAD_ERRORS, TypeError):
        return None


def _abandoned_folder(output_dir: Path, prefix: str) -> Path:
    """A new path ``abandoned/<prefix>_<time>`` in the run's folder (not created; its parent is)."""
    name = f"{prefix}_{time.strftime('%Y%m%d-%H%M%S')}"
    folder, count = output_dir / ABANDONED_DIR / name, 1
    while folder.exists():  # twice within a second
        count += 1
        folder = output_dir / ABANDONED_DIR / f"{name}-{count}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    return folder


def set_aside_later_outputs(output_dir: Path, position: tuple[int, int]) -> None:
    """Moves what the folder holds from beyond ``position``, where this run starts, into
    ``abandoned/from_epochE_stepS_<time>/``: the checkpoints saved further along, a ``model_ema.pth`` of a later
    epoch, and the ``log.txt`` records of epoch E and later (logged). A run that went back (``--resume`` of one of
    its own earlier checkpoints, a fresh start) thus leaves no later file that auto-resume would pick after a crash,
    or that would pass for its own output of the same epoch; nothing is deleted."""
    epoch, step = position
    later = [path for path in sorted(output_dir.glob(ckpt.CHECKPOINT_GLOB))
             if (saved := _saved_position(path)) is not None and saved > position]
    ema_epoch = _saved_ema_epoch(output_dir / ckpt.EMA_NAME)
    if ema_epoch is not None and ema_epoch > epoch:
        later.append(output_dir / ckpt.EMA_NAME)
    log_path = output_dir / JSON_LOG_NAME
    records, _ = read_json_log(log_path)
    later_records = [record for record in records if record["epoch"] >= epoch]
    if not later and not later_records:
        return
    folder = _abandoned_folder(output_dir, f"from_epoch{epoch}_step{step}")
    folder.mkdir(parents=True)
    if later_records and (output_dir / TENSORBOARD_DIR).exists():
        later.append(output_dir / TENSORBOARD_DIR)  # open_tensorboard rebuilds it from the records kept
    for path in later:
        path.rename(folder / path.name)
    if later_records:
        ckpt.atomic_write_text("".join(json_line(record) for record in later_records), folder / JSON_LOG_NAME)
        ckpt.atomic_write_text("".join(json_line(record) for record in records if record["epoch"] < epoch), log_path)
    moved = [", ".join(path.name for path in later)] if later else []
    if later_records:
        epochs = sorted({record["epoch"] for record in later_records})
        moved.append(f"the log.txt records of epoch{'s' if len(epochs) > 1 else ''} {', '.join(map(str, epochs))}")
    logger.warning("this run starts at epoch %d step %d, before what %s holds: moved %s to %s", epoch, step,
                   output_dir, " and ".join(moved), folder)


def _scalar_items(record: dict) -> Iterator[tuple[str, float]]:
    """The TensorBoard scalars of an epoch's record: its numbers but the epoch, and NaN for a null (``log.txt`` holds
    a non-finite value as null, :func:`json_line`), so that a record read back gives the scalars it was written with."""
    for key, value in record.items():
        if key != "epoch" and (value is None or isinstance(value, (int, float))):
            yield key, math.nan if value is None or not math.isfinite(value) else value


def add_record_scalars(writer: "SummaryWriter", record: dict) -> None:
    """The numbers of an epoch's ``log.txt`` record as TensorBoard scalars at step ``epoch``."""
    for key, value in _scalar_items(record):
        writer.add_scalar(key, value, record["epoch"])
    writer.flush()


def _record_scalars(records: list[dict]) -> collections.Counter:
    """How many times each (tag, step) scalar of these ``log.txt`` records is written (:func:`add_record_scalars`)."""
    return collections.Counter((key, record["epoch"]) for record in records for key, _ in _scalar_items(record))


def _tensorboard_scalars(folder: Path) -> collections.Counter:
    """How many times each (tag, step) scalar occurs in the event files of ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    found = collections.Counter()
    for events in sorted(folder.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={SCALARS: 0})  # 0: keep every event
        accumulator.Reload()
        for tag in accumulator.Tags()[SCALARS]:
            found.update((tag, event.step) for event in accumulator.Scalars(tag))
    return found


def open_tensorboard(output_dir: Path) -> "SummaryWriter":
    """The writer of the run's TensorBoard scalars, which mirror ``log.txt``. A ``tensorboard/`` folder that does not
    hold each scalar of the records once (deleted, moved aside with a later pass's records by
    :func:`set_aside_later_outputs`, or cut short by a crash between a record and its scalars) is written anew from
    the records, so an epoch trained again shows its new values only."""
    from torch.utils.tensorboard import SummaryWriter  # slow import, only needed when training

    folder = output_dir / TENSORBOARD_DIR
    records = read_json_log(output_dir / JSON_LOG_NAME)[0]
    expected = _record_scalars(records)
    if folder.exists() and _tensorboard_scalars(folder) != expected:
        aside = _abandoned_folder(output_dir, f"{TENSORBOARD_DIR}_replaced")
        folder.rename(aside)
        logger.warning("%s does not mirror log.txt (scalars missing or repeated): moved to %s and written anew from "
                       "the records", folder, aside)
    if expected and not folder.exists():  # written aside, then renamed: a crash halfway leaves no partial folder
        building = output_dir / f"{TENSORBOARD_DIR}.building"
        shutil.rmtree(building, ignore_errors=True)
        writer = SummaryWriter(str(building))
        for record in records:
            add_record_scalars(writer, record)
        writer.close()
        building.rename(folder)
    return SummaryWriter(str(folder))


def _missing_epoch_outputs(output_dir: Path, epoch: int, outputs: dict, config: CfgNode,
                           with_ema: bool) -> list[str]:
    """Which of :func:`finish_epoch`'s outputs of ``epoch`` are missing or older than it (a newer one is not there:
    :func:`set_aside_later_outputs` moved it when the run started)."""
    done = (epoch + 1, 0)
    best, numbered = _saved_position(output_dir / ckpt.BEST_NAME), _saved_position(_numbered_path(output_dir, epoch))
    ema_epoch = _saved_ema_epoch(output_dir / ckpt.EMA_NAME)
    missing = {
        "best": outputs["is_best"] and (best is None or best < done),
        "numbered": _numbered_due(epoch, config) and (numbered is None or numbered < done),
        "ema": with_ema and (ema_epoch is None or ema_epoch < epoch + 1),
        "log": all(record["epoch"] != epoch for record in read_json_log(output_dir / JSON_LOG_NAME)[0]),
    }
    return [name for name, needed in missing.items() if needed]


def _numbered_path(output_dir: Path, epoch: int) -> Path:
    return output_dir / ckpt.EPOCH_NAME.format(epoch=epoch)


def _numbered_due(epoch: int, config: CfgNode) -> bool:
    """Whether ``epoch`` keeps a numbered checkpoint: every SAVE_FREQ epochs and the last one."""
    return (epoch + 1) % config.SAVE_FREQ == 0 or epoch + 1 == config.TRAIN.EPOCHS


def finish_epoch(output_dir: Path, epoch: int, outputs: dict, position: Position, state: TrainingState,
                 ctx: DistributedContext, writer: "SummaryWriter | None", completing: bool) -> None:
    """Writes what a finished epoch leaves besides ``checkpoint_latest.pth``, which is saved first and holds
    ``outputs``: ``checkpoint_best.pth`` when the epoch was the best so far, its numbered checkpoint when one is due,
    ``model_ema.pth``, its ``log.txt`` record and its TensorBoard scalars. Collective.

    Args:
        completing: A run resumed from an end-of-epoch checkpoint of its own folder: write only the outputs that
            are missing or older than the epoch (a crash between these writes cut them short).
    """
    config = state.config
    names = ["best", "numbered", "ema", "log"]
    if completing:
        names = on_main_rank(ctx.is_main, lambda: _missing_epoch_outputs(output_dir, epoch, outputs, config,
                                                                          state.model_ema is not None),
                             share_result=True)
        if names:
            logger.warning("completing what a crash left unwritten of epoch %d: %s", epoch, ", ".join(names))
    paths = {"best": output_dir / ckpt.BEST_NAME, "numbered": _numbered_path(output_dir, epoch)}
    wanted = {"best": outputs["is_best"], "numbered": _numbered_due(epoch, config)}
    for name, path in paths.items():
        if name in names and wanted[name]:
            save_training_checkpoint(path, state, position, ctx.is_main, epoch_outputs=outputs)

    def write() -> None:
        if "ema" in names and state.model_ema is not None:
            ckpt.atomic_save({"model": state.model_ema.module.state_dict(), "epoch": epoch + 1,
                              "config": config.dump(), CLASSES_KEY: state.classes}, output_dir / ckpt.EMA_NAME)
        if "log" in names:
            write_json_record(output_dir / JSON_LOG_NAME, outputs["record"])
            add_record_scalars(writer, outputs["record"])

    on_main_rank(ctx.is_main, write)
