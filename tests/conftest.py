"""Shared pytest fixtures."""
import logging
import os
import signal
import struct
import subprocess
import zipfile
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

# Without CUDA the Triton backend's tests run its kernels in Triton's interpreter. Triton reads this variable when
# the kernels are decorated (at import), so it is set here, before any test module imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]
LOG_TAIL_CHARS = 3000  # of a child run's output, in an assertion message
ZIP_LOCAL_HEADER_BYTES = 30  # fixed part of a zip local file header; the name and extra-field lengths end it
ZIP_NAME_LENGTHS_AT = 26


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The folder of committed test fixtures (never ../shared)."""
    return FIXTURES


@pytest.fixture
def isolated_logging():
    """main() reconfigures the root logger; give pytest's handlers and level back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


@pytest.fixture
def flip_record_bit() -> Callable[[Path, str], None]:
    """A function that flips the lowest bit of the first data byte of the record whose name ends with ``suffix`` in
    the ``torch.save`` zip archive at ``path``, leaving the archive's structure intact (a bit flip on disk)."""
    def flip(path: Path, suffix: str) -> None:
        with zipfile.ZipFile(path) as archive:
            record = next(record for record in archive.infolist() if record.filename.endswith(suffix))
        data = bytearray(path.read_bytes())
        name_bytes, extra_bytes = struct.unpack_from("<HH", data, record.header_offset + ZIP_NAME_LENGTHS_AT)
        data[record.header_offset + ZIP_LOCAL_HEADER_BYTES + name_bytes + extra_bytes] ^= 1
        path.write_bytes(data)

    return flip


def log_tail(log: Path) -> str:
    """The end of a child run's output file, for assertion messages."""
    return log.read_text(errors="replace")[-LOG_TAIL_CHARS:]


@pytest.fixture
def start_run(tmp_path) -> Iterator[Callable[[str, list[str], dict], tuple[subprocess.Popen, Path]]]:
    """A function that starts ``command`` with ``env`` from the repository root in its own process group (torchrun's
    workers included), its output in ``tmp_path/<name>.log``, and returns the process and the log; at teardown every
    group whose leader still runs is killed, so a failed test leaves no process behind."""
    runs = []

    def start(name: str, command: list[str], env: dict) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.log"
        with log.open("wb") as out:
            run = subprocess.Popen(command, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        runs.append(run)
        return run, log

    yield start
    for run in runs:
        if run.poll() is None:  # not reaped yet, so its process group cannot have been reused
            os.killpg(run.pid, signal.SIGKILL)
        run.wait()
