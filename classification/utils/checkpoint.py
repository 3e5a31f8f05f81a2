"""Training checkpoints: atomic writes, RNG state capture, and finding the newest valid checkpoint to resume from.

A training checkpoint is a ``torch.save`` dict with the keys of :data:`REQUIRED_KEYS` plus ``model_ema``,
``scaler``, ``max_accuracy``, ``rng_states`` (one entry per rank) and ``config`` (yaml text). ``epoch`` and
``step`` say where training continues: epoch ``epoch`` after its first ``step`` batches.
"""
import logging
import os
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

LATEST_NAME = "checkpoint_latest.pth"
BEST_NAME = "checkpoint_best.pth"
EMA_NAME = "model_ema.pth"
EPOCH_NAME = "checkpoint_epoch{epoch:04d}.pth"
CHECKPOINT_GLOB = "checkpoint_*.pth"
REQUIRED_KEYS = ("model", "optimizer", "lr_scheduler", "epoch", "step")
TMP_SUFFIX = ".tmp"
# What a truncated or garbled file raises from torch.load.
LOAD_ERRORS = (RuntimeError, EOFError, OSError, ValueError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile)


def atomic_save(obj: object, path: str | os.PathLike) -> None:
    """Writes ``obj`` with torch.save to a temporary file, flushes and fsyncs it, then renames it over ``path``.

    A crash at any point leaves either the old file or the complete new one, never a partial file at ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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


def load_training_checkpoint(path: str | os.PathLike) -> dict:
    """Loads a training checkpoint on the CPU and checks that it holds :data:`REQUIRED_KEYS`.

    Raises:
        ValueError: When the file cannot be read or lacks a required key (the message names the file).
    """
    try:
        # Our own training checkpoints hold numpy RNG state and the config text: full unpickling is needed.
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except LOAD_ERRORS as err:
        raise ValueError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err})") from err
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint {path} is not a dict")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {missing}")
    return checkpoint


def find_resume_checkpoint(output_dir: str | os.PathLike) -> tuple[Path, dict] | None:
    """The newest valid training checkpoint in ``output_dir`` and its contents, or None.

    Candidates are the ``checkpoint_*.pth`` files, newest first by their (epoch, step) position, then by
    modification time; unreadable ones are reported and skipped.
    """
    candidates = sorted(Path(output_dir).glob(CHECKPOINT_GLOB), key=lambda p: p.stat().st_mtime, reverse=True)
    best = None
    for path in candidates:
        try:
            checkpoint = load_training_checkpoint(path)
        except ValueError as err:
            logger.warning("skipping corrupt checkpoint: %s", err)
            continue
        # Strictly later positions win; at equal positions the newer file (seen first) stays.
        if best is None or (checkpoint["epoch"], checkpoint["step"]) > (best[1]["epoch"], best[1]["step"]):
            best = (path, checkpoint)
    return best
