"""Shared pytest fixtures."""
import logging
import os
from pathlib import Path

import pytest
import torch

# Without CUDA the Triton backend's tests run its kernels in Triton's interpreter. Triton reads this variable when
# the kernels are decorated (at import), so it is set here, before any test module imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

FIXTURES = Path(__file__).resolve().parent / "fixtures"


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
