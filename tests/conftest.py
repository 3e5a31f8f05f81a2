"""Shared pytest fixtures."""
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The folder of committed test fixtures (never ../shared)."""
    return FIXTURES
