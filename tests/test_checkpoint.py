"""Checkpoints: atomic writes, RNG round trip, newest-valid selection with corrupt files skipped."""
import errno
import logging
import os
import random
import re
import stat
import struct
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from classification.config import get_defaults
from classification.utils import checkpoint as ckpt


def make_training_checkpoint(epoch: int, step: int, config_yaml: str = "") -> dict:
    return {"model": {"w": torch.full((3,), float(epoch))}, "optimizer": {}, "epoch": epoch, "step": step,
            "num_updates": 2 * epoch + step, "config": config_yaml or get_defaults().dump(), "rng_states": [{}]}


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full")


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / ckpt.LATEST_NAME
    ckpt.atomic_save(make_training_checkpoint(1, 0), path)
    with pytest.raises(RuntimeError, match="disk full"):
        ckpt.atomic_save({"model": Unpicklable()}, path)
    assert ckpt.load_training_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == [ckpt.LATEST_NAME]  # no temporary file left behind


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2170816 "
                                                  "vs 2170704")], ids=["oserror", "torch-zip-writer"])
def test_a_full_disk_is_one_clear_error_and_the_old_file_stays(tmp_path, monkeypatch, failure):
    path = tmp_path / ckpt.LATEST_NAME
    ckpt.atomic_save(make_training_checkpoint(1, 0), path)

    def fill_the_disk(obj, f):
        f.write(b"partial")
        raise failure

    monkeypatch.setattr(torch, "save", fill_the_disk)
    with pytest.raises(ckpt.CheckpointWriteError, match=rf"could not write {re.escape(str(path))} .*GiB free on its "
                       "file system; if it is full, make room. The file it would have replaced is intact"):
        ckpt.atomic_save(make_training_checkpoint(2, 0), path)
    monkeypatch.undo()
    assert ckpt.load_training_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == [ckpt.LATEST_NAME]


def test_another_failed_write_says_what_failed_without_blaming_the_space(tmp_path, monkeypatch):
    path = tmp_path / ckpt.LATEST_NAME
    monkeypatch.setattr(torch, "save", lambda obj, f: (_ for _ in ()).throw(PermissionError(errno.EACCES, "denied")))
    with pytest.raises(ckpt.CheckpointWriteError, match=r"could not write .*\(PermissionError: .*denied\)\. The file "
                       "it would have replaced is intact") as raised:
        ckpt.atomic_save({}, path)
    assert "GiB free" not in str(raised.value)


def test_partial_writes_left_by_a_crash_are_removed(tmp_path):
    leftovers = [tmp_path / f"{ckpt.LATEST_NAME}.4242.tmp", tmp_path / "config.yaml.17.tmp",
                 tmp_path / "log.txt.5.tmp", tmp_path / f"{ckpt.EMA_NAME}.99.tmp"]
    kept = [tmp_path / ckpt.LATEST_NAME, tmp_path / "notes.tmp", tmp_path / "a.b.tmp", tmp_path / "notes.2024.tmp"]
    for path in leftovers + kept:
        path.write_bytes(b"x")
    assert ckpt.remove_partial_saves(tmp_path) == sorted(leftovers)
    assert sorted(os.listdir(tmp_path)) == sorted(path.name for path in kept)


def test_atomic_save_replaces_in_one_rename(tmp_path, monkeypatch):
    path = tmp_path / "c.pth"
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renames.append((src, dst)), real_replace(src, dst)))
    ckpt.atomic_save(make_training_checkpoint(2, 5), path)
    assert len(renames) == 1 and str(renames[0][1]) == str(path) and str(renames[0][0]).endswith(ckpt.TMP_SUFFIX)
    assert ckpt.load_training_checkpoint(path)["step"] == 5


def test_rng_state_round_trip():
    state = ckpt.capture_rng_state()
    expected = random.random(), np.random.rand(), torch.rand(2)
    random.random(), np.random.rand(), torch.rand(5)
    ckpt.restore_rng_state(state)
    got = random.random(), np.random.rand(), torch.rand(2)
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_newest_valid_checkpoint_wins_and_corrupt_ones_are_skipped(tmp_path, caplog):
    assert ckpt.find_resume_checkpoint(tmp_path) is None
    ckpt.atomic_save(make_training_checkpoint(3, 0), tmp_path / "checkpoint_epoch0002.pth")
    ckpt.atomic_save(make_training_checkpoint(2, 0), tmp_path / "checkpoint_epoch0001.pth")
    ckpt.atomic_save(make_training_checkpoint(3, 4), tmp_path / ckpt.BEST_NAME)
    good = (tmp_path / ckpt.BEST_NAME).read_bytes()
    # The newest files are a truncated copy of a good checkpoint and garbage.
    (tmp_path / ckpt.LATEST_NAME).write_bytes(good[: len(good) // 2])
    time.sleep(0.01)
    (tmp_path / "checkpoint_epoch0009.pth").write_bytes(b"\x00garbage")
    (tmp_path / "checkpoint_incomplete.pth.123.tmp").write_bytes(good)  # a temp file is never a candidate
    (tmp_path / "checkpoint_link.pth").symlink_to(tmp_path / "gone.pth")  # a link to a file deleted since
    with caplog.at_level(logging.WARNING):
        path, position = ckpt.find_resume_checkpoint(tmp_path)
    assert path.name == ckpt.BEST_NAME and position == (3, 4)
    assert ckpt.LATEST_NAME in caplog.text and "checkpoint_epoch0009.pth" in caplog.text
    assert "checkpoint_link.pth is unreadable (FileNotFoundError" in caplog.text
    assert (tmp_path / ckpt.BEST_NAME).read_bytes() == good


def test_a_save_is_durable_before_and_after_its_rename(tmp_path, monkeypatch):
    """The new file's data is fsynced before it replaces the old one, and its folder after (so the rename survives a
    power cut)."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", "folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    ckpt.atomic_save({"w": torch.zeros(2)}, tmp_path / "c.pth")
    assert events == [("fsync", "file"), ("replace", "c.pth"), ("fsync", "folder")]


def test_within_an_epoch_the_further_step_wins_over_the_newer_file(tmp_path):
    ckpt.atomic_save(make_training_checkpoint(2, 3), tmp_path / ckpt.LATEST_NAME)
    time.sleep(0.01)
    ckpt.atomic_save(make_training_checkpoint(2, 0), tmp_path / "checkpoint_epoch0001.pth")  # newer, less far along
    path, position = ckpt.find_resume_checkpoint(tmp_path)
    assert path.name == ckpt.LATEST_NAME and position == (2, 3)


def test_at_equal_positions_the_newest_file_wins(tmp_path):
    older, newer = tmp_path / "checkpoint_b.pth", tmp_path / "checkpoint_a.pth"  # names sort against mtime
    ckpt.atomic_save(make_training_checkpoint(2, 5), older)
    ckpt.atomic_save(make_training_checkpoint(2, 5), newer)
    os.utime(older, (1_000_000, 1_000_000))
    os.utime(newer, (2_000_000, 2_000_000))
    path, position = ckpt.find_resume_checkpoint(tmp_path)
    assert path == newer and position == (2, 5)
    os.utime(older, (3_000_000, 3_000_000))
    assert ckpt.find_resume_checkpoint(tmp_path)[0] == older


def test_a_bit_flip_in_tensor_data_is_caught_and_auto_resume_takes_the_previous_checkpoint(tmp_path, caplog,
                                                                                          flip_record_bit):
    ckpt.atomic_save(make_training_checkpoint(1, 0), tmp_path / "checkpoint_epoch0000.pth")
    latest = tmp_path / ckpt.LATEST_NAME
    ckpt.atomic_save(make_training_checkpoint(2, 0), latest)
    flip_record_bit(latest, "data/0")  # the first byte of model.w: 2.0 becomes 2.0 + 2**-22
    # torch.load itself does not notice: the flipped value loads silently.
    assert torch.load(latest, weights_only=False)["model"]["w"][0].item() == 2.0 + 2.0 ** -22
    assert ckpt.checkpoint_position(latest) == (2, 0)  # the position alone is read without the check
    with pytest.raises(ckpt.TrainingCheckpointError, match=r"latest.pth is corrupt: its record \S+/data/0 fails the "
                       "CRC-32"):
        ckpt.load_training_checkpoint(latest)
    with caplog.at_level(logging.WARNING):
        path, position = ckpt.find_resume_checkpoint(tmp_path)
    assert path.name == "checkpoint_epoch0000.pth" and position == (1, 0)
    assert f"{ckpt.LATEST_NAME} is corrupt" in caplog.text


ZIP_CENTRAL_ENTRY = b"PK\x01\x02"  # signature of a zip central-directory entry
CENTRAL_FIELDS = {"compression": (10, "<H", 8), "attributes": (38, "<I", 0x10)}  # offset, format, value to set
CENTRAL_NAME_LENGTH_AT, CENTRAL_NAME_AT = 28, 46


def _damage_central_entry(path, suffix: str, field: str) -> None:
    """Sets ``field`` of the central-directory entry of the record ending with ``suffix`` (the bit that torch.load
    ignores but Python's zipfile would trust): deflate compression, or the folder attribute."""
    data = bytearray(path.read_bytes())
    offset = data.find(ZIP_CENTRAL_ENTRY)
    while True:
        (name_length,) = struct.unpack_from("<H", data, offset + CENTRAL_NAME_LENGTH_AT)
        if data[offset + CENTRAL_NAME_AT:offset + CENTRAL_NAME_AT + name_length].decode().endswith(suffix):
            break
        offset = data.find(ZIP_CENTRAL_ENTRY, offset + 1)
    at, fmt, value = CENTRAL_FIELDS[field]
    (old,) = struct.unpack_from(fmt, data, offset + at)
    struct.pack_into(fmt, data, offset + at, old | value)
    path.write_bytes(data)


@pytest.mark.parametrize("field", sorted(CENTRAL_FIELDS))
def test_a_damaged_zip_header_is_reported_like_a_bit_flip(tmp_path, caplog, field):
    ckpt.atomic_save(make_training_checkpoint(1, 0), tmp_path / "checkpoint_epoch0000.pth")
    latest = tmp_path / ckpt.LATEST_NAME
    ckpt.atomic_save(make_training_checkpoint(2, 0), latest)
    _damage_central_entry(latest, "data/0", field)
    with pytest.raises(ckpt.TrainingCheckpointError, match=r"latest.pth is corrupt: its record \S+/data/0 fails"):
        ckpt.load_training_checkpoint(latest)
    with caplog.at_level(logging.WARNING):
        path, _ = ckpt.find_resume_checkpoint(tmp_path)
    assert path.name == "checkpoint_epoch0000.pth"


def test_a_compressed_copy_of_a_checkpoint_is_not_called_corrupt(tmp_path):
    """torch.save never compresses, but a re-zipped (deflated) copy reads back fine: its CRCs are checked and pass."""
    saved = tmp_path / "saved.pth"
    ckpt.atomic_save(make_training_checkpoint(2, 3), saved)
    deflated = tmp_path / "checkpoint_deflated.pth"
    with zipfile.ZipFile(saved) as source, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as target:
        for record in source.infolist():
            target.writestr(record.filename, source.read(record))
    assert ckpt.first_crc_mismatch(deflated) is None
    assert ckpt.load_training_checkpoint(deflated)["step"] == 3


def test_checkpoint_without_training_state_is_rejected(tmp_path):
    torch.save({"model": {}}, tmp_path / "checkpoint_weights.pth")
    with pytest.raises(ValueError, match=r"lacks \[.*'optimizer'.*\]: a weights file\? --pretrained loads weights"):
        ckpt.load_training_checkpoint(tmp_path / "checkpoint_weights.pth")
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    with pytest.raises(ckpt.TrainingCheckpointError, match=r"notes\.txt is not a training checkpoint: not a file "
                                                           r"torch\.save wrote"):
        ckpt.load_training_checkpoint(tmp_path / "notes.txt")
    ckpt.atomic_save(make_training_checkpoint(1, 0), tmp_path / "cut.pth")
    data = (tmp_path / "cut.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[:len(data) * 2 // 3])  # an interrupted copy
    with pytest.raises(ckpt.TrainingCheckpointError, match=r"cut\.pth is truncated: a torch\.save file without its "
                                                           r"end"):
        ckpt.load_training_checkpoint(tmp_path / "cut.pth")
    assert ckpt.find_resume_checkpoint(tmp_path) is None
    with pytest.raises(ckpt.TrainingCheckpointError, match=rf"is a folder: give a checkpoint file, e\.g\. "
                                                           rf"{re.escape(str(tmp_path / 'cut.pth'))}$"):  # its newest
        ckpt.load_training_checkpoint(tmp_path)


@pytest.mark.parametrize("error", [PermissionError(errno.EACCES, "Permission denied"),
                                   OSError(errno.EIO, "Input/output error")], ids=["permission", "io"])
def test_a_checkpoint_that_cannot_be_accessed_stops_auto_resume(tmp_path, monkeypatch, error):
    """Falling back to an older checkpoint would overwrite the newer progress of a file that is only unreadable now
    (no permission, or an I/O error of the disk)."""
    ckpt.atomic_save(make_training_checkpoint(1, 0), tmp_path / "checkpoint_epoch0000.pth")
    ckpt.atomic_save(make_training_checkpoint(2, 0), tmp_path / ckpt.LATEST_NAME)
    real_load = torch.load

    def load(path, *args, **kwargs):
        if str(path).endswith(ckpt.LATEST_NAME):
            raise error
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    with pytest.raises(ckpt.CheckpointAccessError,
                       match=f"cannot read checkpoint .*{ckpt.LATEST_NAME}.*{error.strerror}"):
        ckpt.find_resume_checkpoint(tmp_path)
