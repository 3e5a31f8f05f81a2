"""Training checkpoints: atomic writes, RNG state capture, and finding the newest valid checkpoint to resume from.

A training checkpoint is a ``torch.save`` dict with the keys of :data:`REQUIRED_KEYS` plus ``model_ema``,
``scaler``, ``max_accuracy``, ``max_accuracy_ema`` and ``rng_states`` (one entry per rank). ``epoch`` and ``step``
say where training continues: epoch ``epoch`` after its first ``step`` batches; ``num_updates`` counts the optimizer
updates so far (the learning-rate schedule is a function of it and the config); ``config`` is the run's yaml text.
"""
import errno
import logging
import math
import os
import pickle
import random
import re
import shutil
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import torch

logger = logging.getLogger(__name__)

LATEST_NAME = "checkpoint_latest.pth"
BEST_NAME = "checkpoint_best.pth"
EMA_NAME = "model_ema.pth"
EPOCH_NAME = "checkpoint_epoch{epoch:04d}.pth"
CHECKPOINT_GLOB = "checkpoint_*.pth"
REQUIRED_KEYS = ("model", "optimizer", "epoch", "step", "num_updates", "config")
TMP_SUFFIX = ".tmp"
# torch.save reports a failed write (a full disk) as a RuntimeError of its zip writer that names one of these.
ZIP_WRITER_ERROR_MARKERS = ("inline_container", "PytorchStreamWriter")
# The temporary files _atomic_write leaves when a crash cuts it short (NAME.PID.tmp), for the files a run writes.
PARTIAL_WRITE_NAME = re.compile(r"(checkpoint_.+\.pth|model_ema\.pth|log\.txt|config\.yaml)\.\d+\.tmp")
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
CRC_READ_BYTES = 1 << 24  # chunk size when reading a record to check its CRC-32
ZIP_ENCRYPTED_FLAG = 0x1  # general-purpose flag bit of an encrypted zip record
ZIP_LOCAL_HEADER_SIGNATURE = b"PK\x03\x04"  # the first bytes of a zip archive (its first record's header)
MSDOS_DIRECTORY_ATTRIBUTE = 0x10  # external-attribute bit of a zip record that is a folder
# What reading a damaged record raises: a bad header or CRC, a size past the data, a garbled or unknown compression.
RECORD_READ_ERRORS = (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError)
# What a truncated or garbled file raises from torch.load.
LOAD_ERRORS = (RuntimeError, EOFError, OSError, ValueError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile)


def first_crc_mismatch(path: str | os.PathLike) -> str | None:
    """The name of the first damaged record of a ``torch.save`` file, or None: a record whose data does not match its
    stored CRC-32 or cannot be read back (a damaged compression field), or whose zip headers say what ``torch.load``
    would misread (encryption, a folder).

    ``torch.save`` stores a CRC-32 for every record of its zip archive, but ``torch.load`` does not check them: a bit
    flip inside tensor data loads silently as a wrong value. Reading the whole file once finds it. Legacy (non-zip)
    files and records stored without a CRC (0, after ``torch.serialization.set_crc32_options(False)``) are not
    checked.

    Raises:
        OSError: The file cannot be read.
        zipfile.BadZipFile: The archive's directory is damaged.
    """
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        for record in archive.infolist():
            if record.flag_bits & ZIP_ENCRYPTED_FLAG or record.external_attr & MSDOS_DIRECTORY_ATTRIBUTE:
                return record.filename
            if record.CRC == 0:
                continue
            try:
                with archive.open(record) as stream:  # BadZipFile: a bad header, or a CRC mismatch at the end
                    while stream.read(CRC_READ_BYTES):
                        pass
            except RECORD_READ_ERRORS as err:
                logger.debug("%s: record %s: %s", path, record.filename, err)
                return record.filename
    return None


TRUNCATED = "truncated: a torch.save file without its end (the zip directory)"


def is_truncated_archive(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts as a zip archive (as torch.save writes) but lacks its end: an interrupted copy."""
    with open(path, "rb") as stream:
        starts_as_zip = stream.read(len(ZIP_LOCAL_HEADER_SIGNATURE)) == ZIP_LOCAL_HEADER_SIGNATURE
    return starts_as_zip and not zipfile.is_zipfile(path)


class DamagedCheckpointError(ValueError):
    """A ``torch.save`` file with a damaged record (:func:`first_crc_mismatch`); the message names file and record."""


def verify_records(path: str | os.PathLike) -> None:
    """Checks every record of a ``torch.save`` file before it is loaded (:func:`first_crc_mismatch`).

    Raises:
        DamagedCheckpointError: A record is damaged; the message says what that means and what to do.
        OSError: The file cannot be read.
        zipfile.BadZipFile: The archive's directory is damaged.
    """
    damaged = first_crc_mismatch(path)
    if damaged is not None:
        raise DamagedCheckpointError(
            f"checkpoint {path} is corrupt: its record {damaged} fails the CRC-32 or header check of the zip archive "
            "torch.save wrote (torch.load checks neither): a bit flip on disk or in a copy; use another copy")


class CheckpointWriteError(OSError):
    """A file could not be written (e.g. the disk is full); the file it would have replaced is intact."""


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """``write(f)`` into a temporary file beside ``path``, flushed and fsynced, then renamed over ``path``.

    Raises:
        CheckpointWriteError: Writing failed; the message names the file and the free space left.
    """
    tmp = path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        zip_writer = isinstance(err, RuntimeError) and any(marker in str(err) for marker in ZIP_WRITER_ERROR_MARKERS)
        if isinstance(err, RuntimeError) and not zip_writer:
            raise  # not a failed write (e.g. an object torch.save cannot pickle)
        reason = f"could not write {path} ({type(err).__name__}: {str(err).strip()})"
        if zip_writer or err.errno in NO_SPACE_ERRNOS:  # torch's zip writer reports a full disk so
            try:
                reason += f"; {shutil.disk_usage(path.parent).free / 2**30:.2f} GiB free on its file system"
            except OSError:
                pass  # the folder itself is gone: the error above says enough
            reason += "; if it is full, make room"
        raise CheckpointWriteError(f"{reason}. The file it would have replaced is intact: fix this (or give another "
                                   "--output) and restart, which resumes") from err
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_save(obj: object, path: str | os.PathLike) -> None:
    """Writes ``obj`` with torch.save to a temporary file, flushes and fsyncs it, then renames it over ``path``.

    A crash at any point leaves either the old file or the complete new one, never a partial file at ``path``.

    Raises:
        CheckpointWriteError: Writing failed (the disk is full, ...); the old file is intact.
    """
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """:func:`atomic_save` for a UTF-8 text file."""
    _atomic_write(Path(path), lambda f: f.write(text.encode("utf-8")))


def remove_partial_saves(output_dir: str | os.PathLike) -> list[Path]:
    """Deletes the temporary files that a crash in the middle of an atomic write left in ``output_dir`` (the file
    they were to replace is intact); returns them."""
    partial = sorted(path for path in Path(output_dir).glob(f"*{TMP_SUFFIX}")
                     if PARTIAL_WRITE_NAME.fullmatch(path.name))
    for path in partial:
        path.unlink(missing_ok=True)
    return partial


def capture_rng_state() -> dict:
    """The python, numpy, torch and (if present) CUDA generator states of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Restores what :func:`capture_rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainingCheckpointError(ValueError):
    """A training checkpoint that cannot be read or resumed from here; the message names the file."""


class CheckpointAccessError(TrainingCheckpointError):
    """A checkpoint the file system would not let us read (permissions, I/O error): nothing says it is corrupt, so
    auto-resume stops instead of falling back to an older checkpoint and overwriting the newer progress."""


def folder_given(path: str | os.PathLike) -> str:
    """The message for a folder given where a checkpoint file is wanted: the folder's newest ``.pth`` file as the
    example, or that it holds none."""
    candidates = sorted(Path(path).glob("*.pth"), key=modification_time)
    example = f", e.g. {candidates[-1]}" if candidates else " (this folder holds no .pth file)"
    return f"{path} is a folder: give a checkpoint file{example}"


def load_training_checkpoint(path: str | os.PathLike, check_crc: bool = True) -> dict:
    """Loads a training checkpoint on the CPU (memory-mapped: tensors are read when used) and checks that it holds
    :data:`REQUIRED_KEYS`.

    Args:
        path: The checkpoint file.
        check_crc: Also check every record against the CRC-32 torch.save stored (:func:`verify_records`), which
            reads the whole file; without it only the records the caller uses are read.

    Raises:
        CheckpointAccessError: The file system refuses to read it.
        TrainingCheckpointError: The file is corrupt or lacks a required key.
    """
    if Path(path).is_dir():
        raise TrainingCheckpointError(folder_given(path))
    try:
        if check_crc:
            verify_records(path)
        # Our own training checkpoints hold numpy RNG state and the config text: full unpickling is needed.
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except DamagedCheckpointError as err:
        raise TrainingCheckpointError(str(err)) from err
    except OSError as err:
        if isinstance(err, PermissionError) or err.errno == errno.EIO:
            raise CheckpointAccessError(f"cannot read checkpoint {path} ({type(err).__name__}: {err}); fix the access "
                                        "and restart (not resuming from an older checkpoint)") from err
        raise TrainingCheckpointError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err})") from err
    except LOAD_ERRORS as err:
        if not zipfile.is_zipfile(path):  # torch's own message would suggest re-saving it with another option
            what = (TRUNCATED if is_truncated_archive(path)
                    else "not a training checkpoint: not a file torch.save wrote (a zip archive)")
            raise TrainingCheckpointError(f"{path} is {what}") from err
        raise TrainingCheckpointError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err})") from err
    if not isinstance(checkpoint, dict):
        raise TrainingCheckpointError(f"checkpoint {path} is not a dict")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        hint = ": a weights file? --pretrained loads weights, --resume takes a training checkpoint of main.py" if (
            "optimizer" in missing) else ""
        raise TrainingCheckpointError(f"checkpoint {path} lacks {missing}{hint}")
    return checkpoint


def checkpoint_position(path: str | os.PathLike) -> tuple[int, int]:
    """(epoch, step) where training from the checkpoint at ``path`` continues (read without the CRC check)."""
    checkpoint = load_training_checkpoint(path, check_crc=False)
    return checkpoint["epoch"], checkpoint["step"]


def _load_candidate(path: Path, check_crc: bool) -> dict | None:
    """:func:`load_training_checkpoint`, None (with a warning) for a corrupt file."""
    try:
        return load_training_checkpoint(path, check_crc)
    except CheckpointAccessError:
        raise
    except TrainingCheckpointError as err:
        logger.warning("skipping corrupt checkpoint: %s", err)
        return None


def modification_time(path: Path) -> float:
    """``path``'s modification time; -inf for a link to a missing file or a file gone since it was listed (loading it
    then reports it)."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return -math.inf


def find_resume_checkpoint(output_dir: str | os.PathLike) -> tuple[Path, tuple[int, int]] | None:
    """The newest valid training checkpoint in ``output_dir`` and its (epoch, step) position, or None.

    Candidates are the ``checkpoint_*.pth`` files, newest first by their (epoch, step) position, then by
    modification time; corrupt ones are reported and skipped. Only the positions of the candidates are read, then the
    whole of the newest ones until one passes the CRC check.

    Raises:
        CheckpointAccessError: A candidate cannot be read for a reason other than its content.
    """
    by_mtime = sorted(Path(output_dir).glob(CHECKPOINT_GLOB), key=modification_time, reverse=True)
    positions = []
    for path in by_mtime:
        checkpoint = _load_candidate(path, check_crc=False)
        if checkpoint is not None:
            positions.append(((checkpoint["epoch"], checkpoint["step"]), path))
    # A stable sort: at equal positions the newer file stays first.
    for position, path in sorted(positions, key=lambda item: item[0], reverse=True):
        if _load_candidate(path, check_crc=True) is not None:
            return path, position
    return None
