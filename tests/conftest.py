"""Shared pytest fixtures."""
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
